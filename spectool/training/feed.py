"""What the draft reads at each step: this process's rows of the next training (or held-out) batch, the frozen
target's features for them (captured online, or read from stored features), and the objective's other inputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from spectool.training.batches import Batch, collate
from spectool.training.capture import capture_batch
from spectool.training.distributed import DistributedContext, shard_batch
from spectool.training.features import IndexedBatches
from spectool.training.inputs import ExampleSplit, TrainingInputs


class TrainingFeed:
    """Batches and target features for one process of a run.

    ``target`` is the `FrozenTarget` read online (None with stored features); ``needs_target_logits`` asks for
    the target's logits besides its hidden states; ``autocast_dtype`` is the draft's autocast (None: fp32, and the
    features are cast to fp32 to match).
    """

    def __init__(
        self,
        inputs: TrainingInputs,
        split: ExampleSplit,
        batches: IndexedBatches,
        target: Any,
        *,
        needs_target_logits: bool,
        context: DistributedContext,
        autocast_dtype: torch.dtype | None,
    ) -> None:
        self.inputs, self.split, self.batches, self.target = inputs, split, batches, target
        self.needs_target_logits = needs_target_logits
        self.context, self.device, self.autocast_dtype = context, context.device, autocast_dtype

    def next_batch(self) -> tuple[Batch, list[int], int]:
        """This process's rows of the next global batch, the example indices of those rows, and the tokens of the
        global batch to count here (rank 0 counts them, so the sum over processes is the batch's)."""
        batch = next(self.batches)
        tokens = int(batch.attention_mask.sum()) if self.context.is_main else 0
        indices = [self.split.train_index[i] for i in self.batches.last_indices]
        batch, indices = self._this_process_rows(batch, indices)
        return batch.to(self.device), indices, tokens

    def held_out_batches(self, batch_size: int, limit: int | None) -> Iterator[tuple[Batch, list[int]]]:
        """This process's rows of each held-out batch (the first ``limit`` batches), with their example indices."""
        starts = range(0, len(self.split.held_out), batch_size)
        if limit is not None:
            starts = starts[:limit]
        for start in starts:
            chunk = self.split.held_out[start : start + batch_size]
            indices = self.split.held_out_index[start : start + len(chunk)]
            batch, indices = self._this_process_rows(collate(chunk, self.inputs.pad_id), indices)
            yield batch.to(self.device), indices

    def _this_process_rows(self, batch: Batch, indices: list[int]) -> tuple[Batch, list[int]]:
        """This process's share of a global batch and of its example indices (the indices padded like the rows)."""
        if not self.context.enabled:
            return batch, indices
        missing = -len(indices) % self.context.world_size
        indices = (indices + indices[:1] * missing)[self.context.rows(len(indices) + missing)]
        return shard_batch(batch, self.context), indices

    def target_features(self, batch: Batch, indices: list[int]) -> Any:
        """The target's features (and logits, when the objective needs them) for ``batch``."""
        store = self.inputs.store
        if store is not None:
            head = self.inputs.target_lm_head if self.needs_target_logits else None
            features = store.target_batch(indices, batch, lm_head=head, device=self.device)
        else:
            features = capture_batch(self.target, batch, return_logits=self.needs_target_logits)
        if self.autocast_dtype is None:  # an fp32 draft reads a bf16 target's features (no autocast to mix them)
            features = features.to(self.device, torch.float32)
        return features

    def objective_kwargs(self, batch: Batch, generator: torch.Generator) -> dict[str, Any]:
        """What the objective takes besides the target's features."""
        return {
            "target_lm_head": self.inputs.target_lm_head,
            "target_embed": self.inputs.target_embed,
            "generator": generator,
            "position_ids": batch.position_ids,
            "document_ids": batch.document_ids,
        }

    def autocast(self) -> contextlib.AbstractContextManager:
        """The draft's autocast (a no-op for an fp32 draft)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
