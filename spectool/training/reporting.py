"""Send the trainer's metrics rows to experiment trackers (`spectool train --report-to`).

The trainer writes one row per logged step to ``metrics.jsonl`` (`Trainer._log`); a `Reporter` receives the same
rows and forwards every numeric field under its own name with the row's step:

* ``tensorboard`` (the default when the ``tensorboard`` package is installed; it writes local files only):
  event files under ``OUT/tensorboard/``, the resolved configuration as hyper-parameters and as text. A resumed
  run writes with ``purge_step`` = the checkpoint's step + 1, so TensorBoard drops what the killed run logged
  after that checkpoint, as the trainer does with ``metrics.jsonl``.
* ``wandb`` (only when asked: it may upload): ``wandb.init`` with its files under ``OUT/wandb/`` (``WANDB_MODE``,
  ``WANDB_PROJECT`` and the other ``WANDB_*`` variables are honoured); the run id is kept in ``OUT/wandb_run_id``
  so a resumed run continues the same W&B run (``resume="allow"``). W&B keeps only increasing steps: rows a killed
  run logged after its last checkpoint keep their first values there.

Only the main process reports. Bad names, or a tracker whose package is missing, are a `UsageError` raised while
the options are checked, before anything loads.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from spectool.errors import UsageError

REPORTERS = ("tensorboard", "wandb", "none")
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
WANDB_ID_FILE = "wandb_run_id"

_INSTALL = {"tensorboard": "pip install 'spectool[tensorboard]'", "wandb": "pip install 'spectool[wandb]'"}


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def resolve_report_to(value: str | Iterable[str] | None) -> list[str]:
    """The trackers a ``--report-to`` value names (comma list of tensorboard, wandb, none).

    None (not given): ``["tensorboard"]`` when the package is installed, else ``[]``; never wandb.
    """
    if value is None:
        return ["tensorboard"] if _installed("tensorboard") else []
    parts = value.split(",") if isinstance(value, str) else list(value)
    names: list[str] = []
    for part in parts:
        name = str(part).strip().lower()
        if not name:
            continue
        if name not in REPORTERS:
            raise UsageError(f"--report-to: unknown tracker {part.strip()!r}; choose from {', '.join(REPORTERS)}")
        if name not in names:
            names.append(name)
    if not names:
        raise UsageError(f"--report-to: give one or more of {', '.join(REPORTERS)} (comma-separated)")
    if "none" in names:
        if len(names) > 1:
            raise UsageError("--report-to: 'none' cannot be combined with a tracker")
        return []
    for name in names:
        if not _installed(name):
            raise UsageError(f"--report-to {name} needs the {name} package: {_INSTALL[name]}")
    return names


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics row (everything but ``step``; None, booleans and non-finite values left out)."""
    values = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            values[key] = value
    return values


def _hparams(config: dict[str, Any]) -> dict[str, Any]:
    """Configuration values as TensorBoard hyper-parameters accept them (numbers, strings, booleans)."""
    values = {}
    for key, value in sorted(config.items()):
        if isinstance(value, bool | int | float | str):
            values[key] = value
        elif value is None:
            values[key] = "default"
        else:
            values[key] = json.dumps(value)
    return values


class Reporter:
    """Forwards metrics rows to the chosen trackers; ``start_step`` > 0 for a resumed run."""

    def __init__(self, names: list[str], out: Path, config: dict[str, Any], *, start_step: int = 0) -> None:
        self.names = list(names)
        self.out = Path(out)
        self._writer: Any = None
        self._wandb_run: Any = None
        try:
            if "tensorboard" in self.names:
                self._open_tensorboard(config, start_step)
            if "wandb" in self.names:
                self._open_wandb(config)
        except BaseException:
            self.close()
            raise

    def _open_tensorboard(self, config: dict[str, Any], start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        log_dir = self.out / TENSORBOARD_DIR
        log_dir.mkdir(parents=True, exist_ok=True)
        # purge_step: TensorBoard drops the events at steps >= it that earlier files of this directory hold.
        self._writer = SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None, flush_secs=30)
        experiment, session_start, session_end = hparams(_hparams(config), {})
        file_writer = self._writer._get_file_writer()
        for summary in (experiment, session_start, session_end):
            file_writer.add_summary(summary, start_step)
        text = "```json\n" + json.dumps(config, indent=2, sort_keys=True) + "\n```"
        self._writer.add_text("config", text, start_step)
        self._writer.flush()

    def _open_wandb(self, config: dict[str, Any]) -> None:
        import wandb

        directory = self.out / WANDB_DIR
        directory.mkdir(parents=True, exist_ok=True)
        id_file = self.out / WANDB_ID_FILE
        run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(6)  # W&B run ids: letters and digits
            id_file.write_text(run_id + "\n", encoding="utf-8")
        self._wandb_run = wandb.init(
            dir=str(directory),
            id=run_id,
            resume="allow",
            name=self.out.name,
            project=os.environ.get("WANDB_PROJECT") or "spectool",
            config=config,
            allow_val_change=True,
        )

    def log(self, row: dict[str, Any]) -> None:
        step = row.get("step")
        if not isinstance(step, int):
            return
        values = scalars(row)
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, step)
            self._writer.flush()
        if self._wandb_run is not None and values:
            self._wandb_run.log(values, step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb_run is not None:
            run, self._wandb_run = self._wandb_run, None
            run.finish()


def open_reporter(report_to: str | None, out: Path, config: dict[str, Any], *, start_step: int = 0) -> Reporter | None:
    """A `Reporter` for ``--report-to`` (None when it names no tracker)."""
    names = resolve_report_to(report_to)
    return Reporter(names, out, config, start_step=start_step) if names else None


__all__ = ["REPORTERS", "Reporter", "open_reporter", "resolve_report_to", "scalars"]
