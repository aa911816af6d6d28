"""The optimizer and its learning-rate schedule: AdamW over the draft's trainable parameters; linear warmup, then
cosine decay, over a run whose length is set by --max-steps,
--epochs or (planned from the speed of the first steps) --max-minutes.

`make_optimizer` builds the AdamW, `plan_schedule` works out the run's length and warmup, `make_scheduler` wraps the multiplier in torch's LambdaLR
(which saves it, ``total_steps`` with it, in a checkpoint), `restart_schedule` re-applies the current settings to
a resumed scheduler, and `set_total_steps` moves the end of the decay when a --max-minutes run re-plans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from spectool.training.config import TrainConfig

#: A --max-minutes run plans its step count from the speed of its first steps (its default warmup) and re-plans
#: at every log row.
PLAN_AFTER_STEPS = 10


def default_warmup_steps(total_steps: int) -> int:
    """At least the 20 steps upstream asks for, at most a tenth of the run."""
    return max(0, min(max(20, total_steps // 50), total_steps // 10))


@dataclass
class CosineSchedule:
    """The lr multiplier after ``step`` optimizer steps: linear warmup to 1, then cosine down to min_lr_ratio at
    ``total_steps``. A callable object, so LambdaLR saves it (``total_steps`` with it) in the scheduler state;
    a ``--max-minutes`` run moves ``total_steps`` as it re-plans."""

    total_steps: int
    warmup_steps: int
    min_lr_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class SchedulePlan:
    """How long a run is and how long it warms up.

    ``step_cap`` is the most steps --max-steps / --epochs allow (None: only --max-minutes bounds the run);
    ``length_known`` is False while a --max-minutes run without a cap has not planned its length (``total_steps``
    is then a placeholder past the planning step).
    """

    total_steps: int
    warmup_steps: int
    step_cap: int | None
    length_known: bool


def plan_schedule(config: TrainConfig, batches_per_epoch: int) -> SchedulePlan:
    """max_steps or epochs over the training split, whichever ends first (one epoch when none of max_steps, epochs,
    max_minutes is given). With max_minutes those are caps and the total is planned after PLAN_AFTER_STEPS steps;
    until then it is the cap, or unknown."""
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    limits = [config.max_steps] if config.max_steps else []
    if config.epochs or not (limits or config.max_minutes):
        limits.append(max(1, math.ceil((config.epochs or 1.0) * steps_per_epoch)))
    step_cap = min(limits) if limits else None
    length_known = not config.max_minutes or step_cap is not None
    if config.max_minutes:
        total = step_cap if step_cap is not None else PLAN_AFTER_STEPS + 1
        default_warmup = min(PLAN_AFTER_STEPS, default_warmup_steps(step_cap or PLAN_AFTER_STEPS * 10))
    else:
        total = step_cap
        default_warmup = default_warmup_steps(total)
    warmup = config.warmup_steps if config.warmup_steps is not None else default_warmup
    return SchedulePlan(total, warmup, step_cap, length_known)


def make_optimizer(draft: nn.Module, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (torch's default betas) over the draft's trainable parameters; no weight decay on norms and biases."""
    trainable = set(draft.trainable_parameter_names())
    decay, no_decay = [], []
    for name, param in draft.named_parameters():
        if name in trainable and param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def make_scheduler(
    optimizer: torch.optim.Optimizer, plan: SchedulePlan, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping ``optimizer`` along the planned warmup + cosine schedule."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, CosineSchedule(plan.total_steps, plan.warmup_steps, min_lr_ratio)
    )


def restart_schedule(
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    *,
    total_steps: int,
    warmup_steps: int,
    peak_lr: float,
    min_lr_ratio: float,
    step: int,
) -> None:
    """Point a resumed scheduler (and its optimizer) at the current schedule: a resumed run may change --lr or its
    length; the next step's lr comes from the new one."""
    optimizer = scheduler.optimizer
    schedule = CosineSchedule(total_steps, warmup_steps, min_lr_ratio)
    scheduler.base_lrs = [peak_lr] * len(optimizer.param_groups)
    scheduler.lr_lambdas = [schedule] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"] = peak_lr
        group["lr"] = peak_lr * schedule(step)


def set_total_steps(scheduler: torch.optim.lr_scheduler.LambdaLR, total: int) -> None:
    """Move the end of the decay to ``total`` steps (a --max-minutes run that re-planned)."""
    for schedule in scheduler.lr_lambdas:
        schedule.total_steps = total


def plan_due(config: TrainConfig, step: int) -> bool:
    """Whether a --max-minutes run (re-)plans its length after ``step``: first after PLAN_AFTER_STEPS steps, then
    at every log row."""
    return bool(
        config.max_minutes and step >= PLAN_AFTER_STEPS and (step == PLAN_AFTER_STEPS or step % config.log_every == 0)
    )


def planned_steps(
    step: int,
    seconds: float,
    budget_seconds: float,
    cap: int | None,
    *,
    overhead: float = 0.0,
    once: float = 0.0,
    reserve: float = 0.0,
) -> int:
    """Steps that fit ``budget_seconds`` of wall-clock time, at most ``cap``; never fewer than ``step`` (the run
    then ends now). ``seconds`` went into ``step`` optimizer steps, ``overhead`` into the evaluations, checkpoints
    and logging between them (expected to go on at the same rate per step) and ``once`` into loading; ``reserve``
    is kept for what follows the last step (the final evaluation and saves)."""
    per_step = (seconds + overhead) / max(1, step)
    left = budget_seconds - seconds - overhead - once - reserve
    total = step + max(0, math.floor(left / per_step)) if per_step > 0 else step
    return min(total, cap) if cap is not None else total
