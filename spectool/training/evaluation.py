"""Held-out evaluation during training, and the DSpark confidence calibration fitted on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from spectool.training.distributed import DistributedContext, is_fsdp, unwrap
from spectool.training.feed import TrainingFeed


@dataclass
class Evaluation:
    """A held-out evaluation: its ``eval_*`` row ({} when nothing was supervised) and, for a DSpark draft with a
    confidence head, this process's calibration data."""

    row: dict[str, float]
    calibration: list[tuple[torch.Tensor, ...]] = field(default_factory=list)


@torch.no_grad()
def evaluate(model: nn.Module, feed: TrainingFeed, *, seed: int, batch_size: int, limit: int | None) -> Evaluation:
    """Loss and metrics on the held-out split (``eval_``-prefixed), averaged over supervised predictions.

    The objective's randomness (anchors) comes from a generator seeded the same way at every evaluation, so
    evaluations are comparable across steps.
    """
    context = feed.context
    runner = model if is_fsdp(model) else unwrap(model)
    generator = torch.Generator(feed.device).manual_seed(seed + 7919 + context.rank)
    unwrap(model).train(False)
    sums: dict[str, float] = {"supervised": 0.0, "loss_sum": 0.0}
    calibration: list[tuple[torch.Tensor, ...]] = []
    try:
        for batch, indices in feed.held_out_batches(batch_size, limit):
            target_batch = feed.target_features(batch, indices)
            with feed.autocast():
                loss = runner(target_batch, **feed.objective_kwargs(batch, generator))
            output = unwrap(model).last_output
            if output.calibration is not None:
                calibration.append(tuple(t.cpu() for t in output.calibration))
            n = float(output.num_supervised)
            sums["supervised"] += n
            sums["loss_sum"] += float(loss) * n
            for key, value in output.metrics.items():
                if key != "loss":
                    sums[key] = sums.get(key, 0.0) + value * n
    finally:
        unwrap(model).train(True)
    totals = context.sum_over_processes(sums)
    supervised = totals.pop("supervised")
    loss_sum = totals.pop("loss_sum")
    if not supervised:
        return Evaluation({}, calibration)
    row = {"eval_loss": loss_sum / supervised}
    row.update({f"eval_{key}": value / supervised for key, value in totals.items()})
    return Evaluation(row, calibration)


def calibrate_confidence(calibration: list[tuple[torch.Tensor, ...]], context: DistributedContext) -> tuple[Any, int]:
    """DSpark: the prefix scheduler's confidence temperatures (`calibrate_temperatures`) fitted on every
    process's share of an evaluation's calibration data, and the number of held-out blocks behind the fit."""
    from spectool.decoding.draft_length import calibrate_temperatures

    local = tuple(torch.cat(parts) for parts in zip(*calibration, strict=True))
    shares = context.all_gather_object(local)
    logits, hits, supervised = (torch.cat(parts) for parts in zip(*shares, strict=True))
    temperatures = context.decide_on_main(lambda: calibrate_temperatures(logits, hits, supervised))
    return temperatures, int(logits.shape[0])
