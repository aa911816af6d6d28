"""Copy a trained draft into the package as a shipped draft: ``spectool/assets/drafts/NAME``.

    python examples/drafts/ship.py RUN_DIR NAME

RUN_DIR is the output of ``spectool train --config examples/configs/NAME.toml --out RUN_DIR`` on the embedded
target. Only what chat, bench and the ecosystem loaders read goes into the package (config.json,
model.safetensors, spectool.json); the run's metrics.jsonl goes to ``examples/runs/NAME/`` in the repository,
so ``spectool report examples/runs/NAME`` draws the training run of the draft that ships; checkpoints stay
behind. The metadata is made portable: the target becomes ``tiny`` (the embedded target's name, which an
installed spectool resolves to its shipped target), and paths inside this repository become
repository-relative.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FILES = ("config.json", "model.safetensors")
METRICS = "metrics.jsonl"


def relative_to(repo: Path, value: str | None) -> str | None:
    if not value:
        return value
    path = Path(value)
    return str(path.relative_to(repo)) if path.is_absolute() and path.is_relative_to(repo) else value


def replace_dir(staging: Path, destination: Path) -> None:
    shutil.rmtree(destination, ignore_errors=True)
    staging.rename(destination)


def ship(run_dir: Path, name: str, repo: Path = REPO) -> Path:
    assets = repo / "spectool" / "assets"
    metadata = json.loads((run_dir / "spectool.json").read_text())
    if metadata["target"] != "tiny" and Path(metadata["target"]).resolve() != (assets / "tiny-qwen3").resolve():
        raise SystemExit(f"{run_dir} was trained for {metadata['target']}, not the embedded tiny target")
    if not (run_dir / METRICS).is_file():
        raise SystemExit(f"{run_dir} holds no {METRICS}: ship the run directory `spectool train --out` wrote")
    destination = assets / "drafts" / name
    staging = destination.with_name(f".{name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for file in FILES:
        shutil.copy2(run_dir / file, staging / file)
    metadata["target"] = "tiny"  # the embedded target's name, found wherever spectool is installed
    training = metadata.get("training", {})
    for key in ("data", "features"):
        training[key] = relative_to(repo, training.get(key))
    (staging / "spectool.json").write_text(json.dumps(metadata, indent=2) + "\n")
    run_record = repo / "examples" / "runs" / name
    record_staging = run_record.with_name(f".{name}.staging")
    shutil.rmtree(record_staging, ignore_errors=True)
    record_staging.mkdir(parents=True)
    shutil.copy2(run_dir / METRICS, record_staging / METRICS)
    replace_dir(staging, destination)
    replace_dir(record_staging, run_record)
    link = repo / "examples" / "drafts" / name
    if not link.is_symlink():
        link.symlink_to(Path("..", "..", "spectool", "assets", "drafts", name))
    return destination


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(ship(Path(sys.argv[1]).resolve(), sys.argv[2]))
