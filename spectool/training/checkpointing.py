"""The training run's checkpoint, resume and final-draft steps: `CheckpointSteps`, mixed into `Trainer`.

What they write and read is `spectool.training.rundir`'s (atomic checkpoint directories, trainer_state.pt, the
final draft); here is what the trainer puts in them and takes back: the weights (gathered under FSDP), optimizer,
scheduler, random and data state, the counters, and the checks around them (no NaN weights saved, a resumed run's
settings match, a finished run is not trained again).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from spectool.checkpoint import DraftMetadata
from spectool.drafts.from_target import target_metadata
from spectool.errors import UsageError
from spectool.training import rundir
from spectool.training.config import resume_locked
from spectool.training.distributed import (
    exportable_draft,
    full_model_state,
    is_fsdp,
    load_optimizer_state,
    optimizer_state,
    trainable_weights_finite,
)
from spectool.training.optimization import restart_schedule
from spectool.training.progress import TrainingDiverged


class CheckpointSteps:
    """`Trainer`'s checkpoint steps; they read the trainer's state (model, optimizer, scheduler, batches, counters,
    context) and call its `_plan` and `_emit`."""

    def _metadata(self, metrics: dict[str, Any] | None = None) -> DraftMetadata:
        """spectool.json of a checkpoint or of the final draft: the target, and a summary of the training so far."""
        metadata = target_metadata(self.info, self.spec)
        metadata.target_layer_ids = list(self.spec.target_layer_ids)
        metadata.training = rundir.training_summary(
            self.config,
            step=self.step,
            total_steps=self.total_steps,
            tokens=self.tokens,
            seconds=self.seconds,
            metrics=metrics,
            calibration_blocks=getattr(self, "calibration_blocks", None),
        )
        return metadata

    def _check_weights_finite(self) -> None:
        """Refuse to save NaN or infinite weights (a far too high --lr can make them in one step, before any loss
        shows it); every process checks its own parameters (shards under FSDP)."""
        if not trainable_weights_finite(self.model, self.context):
            last = rundir.latest_checkpoint(self.out)
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
            raise TrainingDiverged(
                f"the draft's weights became NaN or infinite by step {self.step}; nothing was saved ({kept}): "
                "lower --lr"
            )

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-<7-digit step>`` atomically (every process must call this), keep the last k."""
        self._check_weights_finite()
        state = full_model_state(self.model) if is_fsdp(self.model) else {}
        optim = optimizer_state(self.model, self.optimizer)
        rng = self.context.all_gather_object(rundir.rng_state(self.generator))
        path = self.context.decide_on_main(
            lambda: rundir.write_checkpoint(
                self.out,
                self.step,
                exportable_draft(self.model, self.draft, state),
                method=self.config.method,
                metadata=self._metadata(),
                trainer_state=self._trainer_state(optim, rng),
                keep_last=self.config.keep_last,
            )
        )
        self.context.barrier()
        self._emit("checkpoint", path=str(path))
        return path

    def _trainer_state(self, optim: dict[str, Any], rng: list[dict[str, Any]]) -> dict[str, Any]:
        """trainer_state.pt of a checkpoint (`rundir.STATE_KEYS`): what --resume needs besides the weights."""
        return {
            "step": self.step,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "overhead_seconds": self.overhead_seconds,
            "once_seconds": self.once_seconds,
            "total_steps": self.total_steps,
            "optimizer": optim,
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "data": self.batches.state_dict(),
            "config": self.resolved_config.to_json(),
            "world_size": self.context.world_size,
        }

    def _load_trainer_state(self, path: Path) -> None:
        """Restore optimizer, scheduler, RNG, data position and counters from a checkpoint (weights were loaded
        with the draft)."""
        state = self.checked.resume_state if self.checked.resume_state is not None else rundir.read_trainer_state(path)
        self.checked.resume_state = None
        rundir.check_resume_settings(
            path, state["config"], self.resolved_config.to_json(), resume_locked(self.config.method)
        )
        load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["data"])
        self.step, self.tokens, self.seconds = int(state["step"]), int(state["tokens"]), float(state["seconds"])
        self.overhead_seconds = float(state.get("overhead_seconds", 0.0))  # absent before 2026-12-07
        self.once_seconds = float(state.get("once_seconds", 0.0))
        self._restore_rng(state["rng"])
        if self.config.max_minutes:
            self._plan()  # the budget counts the time already spent
        if self.step >= self.total_steps:
            if rundir.final_draft_steps(self.out) == self.step:
                raise UsageError(
                    f"the run in {self.out} already finished ({self.step} of {self.total_steps} steps); raise "
                    "--max-steps, --epochs or --max-minutes to train longer"
                )
            # Stopped after its last checkpoint but before (or while) writing the final draft: write it now.
            self.finish_only = True
            self.notes.append(f"all {self.step} steps were done; writing the final draft the run did not finish")
        restart_schedule(
            self.scheduler,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            peak_lr=self.config.peak_lr,
            min_lr_ratio=self.config.min_lr_ratio,
            step=self.step,
        )
        if self.context.is_main:
            rundir.truncate_metrics(self.out, self.step)
            rundir.write_config(self.out, self.resolved_config.to_json())

    def _restore_rng(self, rng: list[dict[str, Any]]) -> None:
        """Each process's random state as saved; on another number of processes, a fresh objective generator."""
        if len(rng) == self.context.world_size:
            rundir.restore_rng_state(rng[self.context.rank], self.generator)
            return
        self.generator.manual_seed(self.config.seed * 1_000_003 + self.context.rank + self.step)
        self.notes.append(
            f"resumed on {self.context.world_size} processes from a run on {len(rng)}: the data continues exactly, "
            "the objective's random draws do not"
        )

    def save_final(self, metrics: dict[str, Any], eval_metrics: dict[str, Any]) -> Path:
        """The trained draft in OUT itself (ecosystem format + spectool.json with a ``training`` summary)."""
        self._check_weights_finite()
        state = full_model_state(self.model) if is_fsdp(self.model) else {}
        final_metrics = {k: v for k, v in {**metrics, **eval_metrics}.items() if isinstance(v, (int, float))}
        self.context.decide_on_main(
            lambda: rundir.write_final(
                self.out,
                exportable_draft(self.model, self.draft, state),
                method=self.config.method,
                metadata=self._metadata(final_metrics),
                dtype=getattr(torch, self.config.save_dtype),
            )
        )
        self.context.barrier()
        return self.out
