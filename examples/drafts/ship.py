"""Copy a trained draft into the package as a shipped draft: ``spectool/assets/drafts/NAME``.

    python examples/drafts/ship.py RUN_DIR NAME

RUN_DIR is the output of ``spectool train --config examples/configs/NAME.toml --out RUN_DIR`` on the embedded
target. Only what chat, bench and the ecosystem loaders read is copied (config.json, model.safetensors,
spectool.json); checkpoints and metrics stay behind. The metadata is made portable: the target becomes
``../../tiny-qwen3`` (resolved against the draft's own directory, so an installed spectool finds its shipped
target), and paths inside this repository become repository-relative.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "spectool" / "assets"
FILES = ("config.json", "model.safetensors")


def relative_to_repo(value: str | None) -> str | None:
    if not value:
        return value
    path = Path(value)
    return str(path.relative_to(REPO)) if path.is_absolute() and path.is_relative_to(REPO) else value


def ship(run_dir: Path, name: str) -> Path:
    metadata = json.loads((run_dir / "spectool.json").read_text())
    if Path(metadata["target"]).resolve() != (ASSETS / "tiny-qwen3").resolve():
        raise SystemExit(f"{run_dir} was trained for {metadata['target']}, not the embedded tiny target")
    destination = ASSETS / "drafts" / name
    staging = destination.with_name(f".{name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for file in FILES:
        shutil.copy2(run_dir / file, staging / file)
    metadata["target"] = "../../tiny-qwen3"
    training = metadata.get("training", {})
    for key in ("data", "features"):
        training[key] = relative_to_repo(training.get(key))
    (staging / "spectool.json").write_text(json.dumps(metadata, indent=2) + "\n")
    shutil.rmtree(destination, ignore_errors=True)
    staging.rename(destination)
    link = REPO / "examples" / "drafts" / name
    if not link.is_symlink():
        link.symlink_to(Path("..", "..", "spectool", "assets", "drafts", name))
    return destination


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(ship(Path(sys.argv[1]).resolve(), sys.argv[2]))
