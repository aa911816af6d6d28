"""A training run's directory (``--out``): what is in it, how each file is written, and how a run resumes from it.

::

    train_config.json                 the resolved configuration (what `--resume` continues)
    metrics.jsonl                     one JSON object per logged step (eval rows add eval_*)
    tensorboard/, wandb/              the same rows for TensorBoard / W&B (--report-to; spectool.training.reporting)
    checkpoints/step-0000500/         config.json + model.safetensors + spectool.json (the draft, ecosystem format,
                                      float32) and trainer_state.pt (optimizer, scheduler, RNG, data position, step)
    config.json, model.safetensors,   the final draft in the method's ecosystem format, loadable by
    spectool.json                     `spectool chat --draft OUT` (spectool.json names its target)

Checkpoints are written atomically (`spectool.checkpoint.save_draft`): a kill while writing leaves the previous
ones intact, and a resume falls back from an unreadable newest checkpoint to the one before it. The final draft
is renamed into place file by file, spectool.json last, so a kill in between leaves a run that `--resume` finishes.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectool.checkpoint import METADATA_FILE, DraftMetadata, save_draft
from spectool.errors import SpectoolError, UsageError
from spectool.paths import (
    CHECKPOINTS_DIR,
    DRAFT_FILES,
    METRICS_FILE,
    RUN_CONFIG_FILE,
    TRAINER_STATE_FILE,
    check_force_target,
    fsync_dir,
    make_output_dir,
    refuse_inputs_inside,
)
from spectool.training.config import TrainConfig
from spectool.training.distributed import DistributedContext

CONFIG_FILE = RUN_CONFIG_FILE
STATE_FILE = TRAINER_STATE_FILE
FINAL_FILES = DRAFT_FILES
_CHECKPOINT_NAME = re.compile(r"^step-(\d{7})$")

#: What a trainer_state.pt must hold (see `write_checkpoint`).
STATE_KEYS = ("step", "tokens", "seconds", "total_steps", "optimizer", "scheduler", "rng", "data", "config")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: listing, reading back, choosing where to resume
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_dir(out: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives (``OUT/checkpoints/step-<7-digit step>``)."""
    return out / CHECKPOINTS_DIR / f"step-{step:07d}"


def complete_checkpoints(out: str | Path) -> list[Path]:
    """The complete checkpoints under ``OUT/checkpoints`` (with their trainer_state.pt and weights), newest first."""
    found = []
    for path in (Path(out) / CHECKPOINTS_DIR).glob("step-*"):
        match = _CHECKPOINT_NAME.match(path.name)
        if match and (path / STATE_FILE).is_file() and (path / "model.safetensors").is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found, reverse=True)]


def latest_checkpoint(out: str | Path) -> Path | None:
    """The highest-step complete checkpoint under ``OUT/checkpoints`` (one with its trainer_state.pt), or None."""
    found = complete_checkpoints(out)
    return found[0] if found else None


def read_trainer_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer state, read without running any code from the file (``weights_only=True``: tensors,
    numbers, strings and containers only; a pickle that asks for anything else is refused with one line)."""
    file = path / STATE_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # a crafted or corrupt pickle raises anything; nothing of it runs
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            reason = "it holds objects other than tensors and plain values, which spectool never writes"
        raise SpectoolError(f"{file}: unreadable trainer state ({reason[:200]})") from None
    if not isinstance(state, dict):
        raise SpectoolError(f"{file}: unreadable trainer state (not a dictionary)")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise SpectoolError(f"{file}: trainer state lacks {', '.join(missing)}; resume from another checkpoint")
    return state


@dataclass
class ResumePoint:
    """The checkpoint a resumed run continues from, its trainer state, and warnings about newer ones skipped."""

    path: Path
    state: dict[str, Any]
    skipped: list[str]


def find_resume_point(out: Path) -> ResumePoint:
    """The newest checkpoint that reads back whole (trainer state, weights, config); newer unreadable ones are
    skipped with a warning, so a corrupt latest checkpoint falls back to the one before it."""
    from safetensors import safe_open

    candidates = complete_checkpoints(out)
    if not candidates:
        raise UsageError(
            f"nothing to resume in {out}: no complete checkpoint under {out / CHECKPOINTS_DIR}; leave out --resume "
            "to start a fresh run (with --force to replace the files spectool wrote there)"
        )
    skipped: list[str] = []
    for path in candidates:
        try:
            state = read_trainer_state(path)
            try:
                # Opening checks the header against the file's length (a lost tail is found); the tensors are read
                # once, when the draft loads.
                with safe_open(str(path / "model.safetensors"), framework="pt"):
                    pass
                json.loads((path / "config.json").read_text(encoding="utf-8"))
            except Exception as exc:  # truncated or garbled weights / config
                raise SpectoolError(f"{path}: unreadable draft ({str(exc).splitlines()[0][:200]})") from None
        except SpectoolError as exc:
            skipped.append(str(exc))
            continue
        if skipped:
            skipped = [f"{reason}; resuming from the previous checkpoint, {path.name}" for reason in skipped]
        return ResumePoint(path, state, skipped)
    raise SpectoolError(f"no readable checkpoint in {out / CHECKPOINTS_DIR}: " + " | ".join(skipped))


def check_output(out: Path, *, resume: bool, force: bool, inputs: dict[str, str | None]) -> ResumePoint | list[Path]:
    """Check the run directory before anything loads; nothing is removed here.

    A resume needs a readable checkpoint in OUT (returned). A fresh run needs OUT empty, or ``force`` and only
    spectool's own run files in it (returned: what to remove once every other check has passed). OUT may never
    be, nor contain, one of the run's ``inputs`` (the target, data, --init, features).
    """
    refuse_inputs_inside(out, inputs)
    if resume:
        return find_resume_point(out)
    remove = check_force_target(out, force=force, hint="continue its run with --resume")
    make_output_dir(out)
    return remove


@dataclass
class RunDirectoryCheck:
    """What checking OUT found: the checkpoint to resume from (None for a fresh run) and, on rank 0, its trainer
    state; what --force replaces (rank 0); warnings about newer checkpoints skipped as unreadable."""

    resume_from: Path | None
    resume_state: dict[str, Any] | None
    to_remove: list[Path]
    skipped: list[str]


def check_run_directory(
    config: TrainConfig, context: DistributedContext, *, resume: bool, force: bool
) -> RunDirectoryCheck:
    """`check_output` of ``config.out`` on rank 0, its verdict shared with every process."""
    out = Path(config.out).expanduser()
    inputs = {"--target": config.target}  # a resumed run writes its final draft into OUT
    if not resume:  # a fresh one may also remove what --force replaces
        inputs.update({"--data": config.data, "--init": config.init, "--features": config.features})
    found = RunDirectoryCheck(None, None, [], [])

    def check() -> tuple[Path | None, list[str]]:
        checked = check_output(out, resume=resume, force=force, inputs=inputs)
        if isinstance(checked, ResumePoint):
            found.resume_state = checked.state  # rank 0 keeps it; the others read their own copy
            return checked.path, checked.skipped
        found.to_remove = checked
        return None, []

    found.resume_from, found.skipped = context.decide_on_main(check)
    return found


def check_resume_settings(path: Path, saved: dict[str, Any], now: dict[str, Any], locked: tuple[str, ...]) -> None:
    """Refuse to resume the checkpoint at ``path`` with other values of the ``locked`` settings than it was
    trained with (``saved`` and ``now`` are resolved configurations)."""
    changed = [name for name in locked if saved.get(name) != now.get(name)]
    if changed:
        detail = "; ".join(f"{n}: saved {saved.get(n)!r}, now {now.get(n)!r}" for n in changed)
        raise UsageError(f"{path} was trained with other settings ({detail}); resume with the saved ones")


# ----------------------------------------------------------------------------------------------------------------
# Random state (one entry per process in trainer_state.pt)
# ----------------------------------------------------------------------------------------------------------------


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """This process's random state: Python's, torch's, the objective's ``generator`` and CUDA's."""
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    """Put back what `rng_state` saved."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# Writing: checkpoints, the final draft, train_config.json
# ----------------------------------------------------------------------------------------------------------------


def write_checkpoint(
    out: Path,
    step: int,
    draft: nn.Module,
    *,
    method: str,
    metadata: DraftMetadata,
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write ``checkpoints/step-<7-digit step>`` atomically (the draft in float32 and ``trainer_state``), keep the
    newest ``keep_last`` and make the metrics logged so far durable with it."""
    path = checkpoint_dir(out, step)

    def write() -> Path:
        buffer = io.BytesIO()
        torch.save(trainer_state, buffer)
        save_draft(
            draft,
            path,
            method=method,
            metadata=metadata,
            dtype=torch.float32,
            extra_files={STATE_FILE: buffer.getvalue()},
        )
        prune_checkpoints(out, keep_last)
        fsync_file(out / METRICS_FILE)  # the rows up to this checkpoint survive a power cut with it
        return path

    return _wrap_os_errors(write, path)


def prune_checkpoints(out: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints; remove temporary directories left by killed saves."""
    root = out / CHECKPOINTS_DIR
    steps = sorted(p for p in root.glob("step-*") if _CHECKPOINT_NAME.match(p.name))
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp-*"):
        if not stale.name.endswith(f".tmp-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


def write_final(out: Path, draft: nn.Module, *, method: str, metadata: DraftMetadata, dtype: torch.dtype) -> Path:
    """The trained draft in OUT itself (FINAL_FILES), replacing any earlier one file by file."""

    def write() -> Path:
        staging = out / ".final-draft"
        shutil.rmtree(staging, ignore_errors=True)
        save_draft(draft, staging, method=method, metadata=metadata, dtype=dtype)
        # spectool.json goes first and comes back last, so a kill in between leaves a draft that --resume
        # sees as unfinished (and writes again); weights, then config.json: each rename is atomic.
        (out / FINAL_FILES[-1]).unlink(missing_ok=True)
        fsync_dir(out)
        for name in FINAL_FILES:
            os.replace(staging / name, out / name)
        fsync_dir(out)
        shutil.rmtree(staging, ignore_errors=True)
        return out

    return _wrap_os_errors(write, out)


def training_summary(
    config: TrainConfig,
    *,
    step: int,
    total_steps: int,
    tokens: int,
    seconds: float,
    metrics: dict[str, Any] | None = None,
    calibration_blocks: int | None = None,
) -> dict[str, Any]:
    """The ``training`` entry of a checkpoint's or a final draft's spectool.json. A run from ``--init`` names the
    draft it started from and carries that draft's own ``training`` entry (`init_record`), so the figures of a
    draft trained in stages add up."""
    summary: dict[str, Any] = {
        "steps": step,
        "total_steps": total_steps,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "data": config.data,
        "features": config.features,
        "global_batch": config.batch_size * config.grad_accum,
        "lr": config.peak_lr,
        "seed": config.seed,
    }
    if config.init:
        summary["init"] = init_record(config.init)
    if metrics:
        summary["final_metrics"] = metrics
    if calibration_blocks:
        summary["confidence_calibration_blocks"] = calibration_blocks  # held-out blocks behind the fit
    return summary


def init_record(init: str) -> dict[str, Any]:
    """``{"from": init, "training": ...}``: the ``--init`` draft and the ``training`` entry of its spectool.json (left
    out when the directory no longer holds a readable one, e.g. a resumed run whose --init draft was removed)."""
    record: dict[str, Any] = {"from": init}
    try:
        previous = json.loads((Path(init).expanduser() / METADATA_FILE).read_text(encoding="utf-8")).get("training")
    except (OSError, ValueError, AttributeError):
        previous = None
    if isinstance(previous, dict) and previous:
        record["training"] = previous
    return record


def final_draft_steps(out: Path) -> int | None:
    """The step count recorded by a whole final draft in ``out`` (all of FINAL_FILES), or None."""
    if not all((out / name).is_file() for name in FINAL_FILES):
        return None
    try:
        steps = json.loads((out / FINAL_FILES[-1]).read_text(encoding="utf-8"))["training"]["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return steps if isinstance(steps, int) else None


def write_config(out: Path, config: dict[str, Any]) -> None:
    """``train_config.json``, replaced atomically."""
    path = out / CONFIG_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    """Flush ``path`` to disk, if it exists."""
    if path.is_file():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def _wrap_os_errors(write: Callable[[], Path], path: Path) -> Path:
    try:
        return write()
    except OSError as exc:
        raise SpectoolError(f"cannot write {path}: {exc.strerror or exc}") from None


# ----------------------------------------------------------------------------------------------------------------
# metrics.jsonl
# ----------------------------------------------------------------------------------------------------------------


def append_metrics(out: Path, row: dict[str, Any]) -> None:
    """Add one row to ``metrics.jsonl``."""
    with open(out / METRICS_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def logged_metrics(out: Path, step: int) -> dict[str, Any]:
    """The training metrics logged at ``step`` (without eval_*), or {}."""
    path = out / METRICS_FILE
    row: dict[str, Any] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict) and data.get("step") == step:
                row = {k: v for k, v in data.items() if not k.startswith("eval_")}
    return row


def truncate_metrics(out: Path, step: int) -> None:
    """Drop rows logged after ``step`` (a resumed run logs them again)."""
    path = out / METRICS_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue  # a line cut off by a kill
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
