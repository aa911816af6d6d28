"""A training run's state on disk: `RunCheckpoints` saves a checkpoint and the final draft, and puts a checkpoint's
state back, for `Trainer`.

What it writes and reads is `spectool.training.rundir`'s (atomic checkpoint directories, trainer_state.pt, the
final draft); here is what goes into them and comes back: the weights (gathered under FSDP) of the parts a run
trains (`TrainingParts`), the optimizer, scheduler, random and data state, the counters (`RunCounters`), and the
checks around them (no NaN weights saved, a resumed run's settings match).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectool.checkpoint import DraftMetadata
from spectool.training import rundir
from spectool.training.config import resume_locked
from spectool.training.distributed import (
    DistributedContext,
    exportable_draft,
    full_model_state,
    is_fsdp,
    load_optimizer_state,
    optimizer_state,
    trainable_weights_finite,
)
from spectool.training.features import IndexedBatches
from spectool.training.progress import TrainingDiverged


@dataclass
class TrainingParts:
    """What a checkpoint holds the state of: the trained model (possibly wrapped: DDP, FSDP) and its draft, the
    optimizer, the lr scheduler, the objective's random generator and the data order."""

    model: nn.Module
    draft: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    batches: IndexedBatches


@dataclass
class RunCounters:
    """How far a run has got: optimizer steps and tokens, and the wall-clock seconds --max-minutes counts (in the
    steps, between them: evaluations, checkpoints, logging, and once: loading)."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    overhead_seconds: float = 0.0
    once_seconds: float = 0.0


@dataclass
class RestoredState:
    """A checkpoint's state put back: its counters and the step count it planned, and what to tell the user."""

    counters: RunCounters
    notes: list[str]


class RunCheckpoints:
    """The checkpoints and final draft of the run in `out`, written by every process together (`context`)."""

    def __init__(self, out: Path, context: DistributedContext, *, method: str, keep_last: int) -> None:
        self.out, self.context, self.method, self.keep_last = out, context, method, keep_last

    def check_finite(self, model: nn.Module, step: int) -> None:
        """Refuse to save NaN or infinite weights (a far too high --lr can make them in one step, before any loss
        shows it); every process checks its own parameters (shards under FSDP)."""
        if not trainable_weights_finite(model, self.context):
            last = rundir.latest_checkpoint(self.out)
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
            raise TrainingDiverged(
                f"the draft's weights became NaN or infinite by step {step}; nothing was saved ({kept}): lower --lr"
            )

    def save(
        self, parts: TrainingParts, counters: RunCounters, total_steps: int, metadata: DraftMetadata, config: dict
    ) -> Path:
        """Write ``checkpoints/step-<7-digit step>`` atomically and keep the last `keep_last`; `config` is the
        resolved train_config.json the state belongs to."""
        self.check_finite(parts.model, counters.step)
        weights = full_model_state(parts.model) if is_fsdp(parts.model) else {}
        optim = optimizer_state(parts.model, parts.optimizer)
        rng = self.context.all_gather_object(rundir.rng_state(parts.generator))
        state = {  # trainer_state.pt (`rundir.STATE_KEYS`): what --resume needs besides the weights
            "step": counters.step,
            "tokens": counters.tokens,
            "seconds": counters.seconds,
            "overhead_seconds": counters.overhead_seconds,
            "once_seconds": counters.once_seconds,
            "total_steps": total_steps,
            "optimizer": optim,
            "scheduler": parts.scheduler.state_dict(),
            "rng": rng,
            "data": parts.batches.state_dict(),
            "config": config,
            "world_size": self.context.world_size,
        }
        path = self.context.decide_on_main(
            lambda: rundir.write_checkpoint(
                self.out,
                counters.step,
                exportable_draft(parts.model, parts.draft, weights),
                method=self.method,
                metadata=metadata,
                trainer_state=state,
                keep_last=self.keep_last,
            )
        )
        self.context.barrier()
        return path

    def save_final(self, parts: TrainingParts, step: int, metadata: DraftMetadata, dtype: str) -> Path:
        """The trained draft in OUT itself (the method's ecosystem format + spectool.json), in `dtype`."""
        self.check_finite(parts.model, step)
        weights = full_model_state(parts.model) if is_fsdp(parts.model) else {}
        self.context.decide_on_main(
            lambda: rundir.write_final(
                self.out,
                exportable_draft(parts.model, parts.draft, weights),
                method=self.method,
                metadata=metadata,
                dtype=getattr(torch, dtype),
            )
        )
        self.context.barrier()
        return self.out

    def restore(
        self, path: Path, parts: TrainingParts, config: dict, *, seed: int, state: dict[str, Any] | None = None
    ) -> RestoredState:
        """Put back the optimizer, scheduler, random state and data position of the checkpoint at `path` (its
        weights were loaded with the draft; `state`: its trainer_state.pt when already read) after checking that
        the resolved `config` keeps the settings the state depends on."""
        state = state if state is not None else rundir.read_trainer_state(path)
        rundir.check_resume_settings(path, state["config"], config, resume_locked(config["method"]))
        load_optimizer_state(parts.model, parts.optimizer, state["optimizer"])
        parts.scheduler.load_state_dict(state["scheduler"])
        parts.batches.load_state_dict(state["data"])
        counters = RunCounters(
            int(state["step"]),
            int(state["tokens"]),
            float(state["seconds"]),
            float(state.get("overhead_seconds", 0.0)),  # absent before 2026-12-07
            float(state.get("once_seconds", 0.0)),
        )
        notes = self._restore_rng(state["rng"], parts.generator, seed=seed, step=counters.step)
        return RestoredState(counters, notes)

    def _restore_rng(self, rng: list[dict[str, Any]], generator: torch.Generator, *, seed: int, step: int) -> list[str]:
        """Each process's random state as saved; on another number of processes, a fresh objective generator."""
        context = self.context
        if len(rng) == context.world_size:
            rundir.restore_rng_state(rng[context.rank], generator)
            return []
        generator.manual_seed(seed * 1_000_003 + context.rank + step)
        return [
            f"resumed on {context.world_size} processes from a run on {len(rng)}: the data continues exactly, "
            "the objective's random draws do not"
        ]


__all__ = ["RestoredState", "RunCheckpoints", "RunCounters", "TrainingParts"]
