"""What a training run reports: events for its caller, the metrics row of each logged step, its result, and the
two ways it stops early."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from spectool.errors import SpectoolError
from spectool.training.features import IndexedBatches


class TrainingInterrupted(SpectoolError):
    """Stopped by Ctrl-C (exit 130) or SIGTERM (exit 143) after saving a checkpoint."""


class TrainingDiverged(SpectoolError):
    """The loss or the gradient became NaN or infinite; nothing was saved after the last good checkpoint."""


@dataclass
class TrainEvent:
    """What the trainer reports to its caller (the command line draws progress from these).

    ``start``: ``info`` describes the run; ``step``: a step finished; ``log`` / ``eval``: ``row`` is the metrics
    row just written; ``checkpoint``: ``path`` was saved; ``done``: the final draft is in ``path``.
    ``total_steps`` is None while a --max-minutes run has not planned its length yet.
    """

    kind: Literal["start", "step", "log", "eval", "checkpoint", "done"]
    step: int
    total_steps: int | None
    row: dict[str, Any] | None = None
    path: str | None = None
    info: dict[str, Any] | None = None


@dataclass
class TrainResult:
    """What a finished run did: where its draft is, how far it went, and its last metrics."""

    out: Path
    steps: int
    tokens: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)  # the last logged training row
    eval_metrics: dict[str, float] = field(default_factory=dict)  # the final evaluation (eval_*)
    resumed_from: int | None = None


class MetricsWindow:
    """Sums over the steps since the last log row, and the metrics.jsonl row they make."""

    def __init__(self) -> None:
        self.steps = 0
        self.loss_sum = self.supervised = self.tokens = self.seconds = self.target_seconds = 0.0
        self.metric_sums: dict[str, float] = {}
        self.grad_norm = 0.0

    def add(self, stats: dict[str, Any]) -> None:
        """Count one step's statistics (`Trainer.train_step`)."""
        self.steps += 1
        self.loss_sum += stats["loss_sum"]
        self.supervised += stats["supervised"]
        self.tokens += stats["tokens"]
        self.seconds += stats["seconds"]
        self.target_seconds += stats["target_seconds"]
        self.grad_norm = stats["grad_norm"]
        for key, value in stats["metric_sums"].items():
            self.metric_sums[key] = self.metric_sums.get(key, 0.0) + value

    def row(self, step: int, lr: float, batches: IndexedBatches, tokens_total: int) -> dict[str, Any]:
        """The log row at ``step``: means over the supervised predictions of the window, speeds over its time."""
        supervised = self.supervised
        row: dict[str, Any] = {
            "step": step,
            "epoch": round(batches.epoch + batches.position / len(batches.examples), 4),
            "loss": self.loss_sum / supervised if supervised else None,
        }
        row.update({key: value / supervised for key, value in sorted(self.metric_sums.items()) if supervised})
        row.update(
            {
                "lr": lr,
                "grad_norm": self.grad_norm,
                "tokens": tokens_total,
                "supervised": int(self.supervised),
                "tokens_per_second": self.tokens / self.seconds if self.seconds else 0.0,
                "step_seconds": self.seconds / max(1, self.steps),
                "target_forward_fraction": self.target_seconds / self.seconds if self.seconds else 0.0,
            }
        )
        return row
