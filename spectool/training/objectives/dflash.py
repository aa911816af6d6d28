"""DFlash objective (its paper): block diffusion over target features, hard cross entropy with decaying slot weights.

1. Anchors: up to ``num_anchors`` per row, sampled uniformly without replacement (``generator``) among positions a
   where x_a and x_{a+1} are labels of a's document (``blocks.anchor_candidates``, the reference rule). A block that
   runs past its document's (or the row's) end is cut: its slots there are invalid (step 3). Rows with fewer
   candidates get padding blocks.
2. Blocks ``[x_a, MASK x (B-1)]`` are embedded with the TARGET's embedding and drafted in ONE forward over
   ``[context features | all blocks]`` (``blocks.block_layout``: context strictly before the anchor in its document,
   the own block bidirectionally).
3. Slot k = 1..B-1 predicts x_{a+k} through the target's lm_head (slot 0 is the known anchor). A slot is valid when
   x_{a+k} is a label in the anchor's document. The loss is the hard CE weighted by ``w_k = exp(-(k-1)/gamma)``,
   normalised by the weight sum over valid slots. ``gamma`` defaults to ``blocks.default_gamma(B - 1)``: the
   published 4 / 5 / 7 for B = 8 / 10 / 16, piecewise linear in between and beyond.

Metrics: ``ce`` (= the loss); for slots k = 1..B-1, over blocks whose slots 1..k are all valid: ``acc@k``, the rate
at which slot k's argmax is the target's own greedy token after x_{a+k-1} (what verification accepts, as every
method scores a hit), and ``prefix@k``, the rate at which slots 1..k ALL are (greedy prefix hits); ``acceptance_length = 1 + sum_k prefix@k``, the expected greedy acceptance length of a block (estimated on
the sampled blocks); ``anchors``, the valid blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spectool.drafts import Qwen3DFlashDraftModel, block_input_ids
from spectool.target import TargetBatch

from .base import (
    Documents,
    ObjectiveOutput,
    chain_statistics,
    check_positive,
    finish,
    project,
    rate_metrics,
    weighted_row_chunks,
)
from .blocks import BlockObjective, block_layout, default_gamma, slot_labels, target_choices


class DFlashObjective(BlockObjective):
    """DFlash training loss for a ``Qwen3DFlashDraftModel``; see the module docstring."""

    method = "dflash"
    draft_class = Qwen3DFlashDraftModel
    needs_target_logits = False

    def __init__(self, draft: Qwen3DFlashDraftModel, *, num_anchors: int = 512, gamma: float | None = None) -> None:
        super().__init__(draft)
        self.block_size = int(draft.config.block_size)
        self.num_anchors = int(num_anchors)
        self.gamma = float(gamma) if gamma is not None else default_gamma(self.block_size - 1)
        check_positive("num_anchors", self.num_anchors)
        check_positive("gamma", self.gamma)

    def loss_at(
        self,
        batch: TargetBatch,
        anchors: torch.Tensor,
        anchor_valid: torch.Tensor,
        *,
        target_lm_head: nn.Module,
        target_embed: nn.Module,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        """Steps 2-3 for given anchors ``[B, A]`` (``anchor_valid`` False marks padding blocks)."""
        block = self.block_size
        docs = Documents.of(batch, document_ids)
        input_ids = batch.input_ids
        with torch.no_grad():
            embeds = target_embed(block_input_ids(input_ids.gather(1, anchors), block, self.draft.config.mask_token_id))
        positions, mask = block_layout(anchors, anchor_valid, docs, block, position_ids)
        hidden = self.draft(embeds, batch.target_hidden_states, positions, mask)
        hidden = hidden.view(*anchors.shape, block, hidden.shape[-1])[:, :, 1:]  # slots 1..B-1

        offsets = torch.arange(1, block, device=anchors.device)
        labels, valid = slot_labels(input_ids, batch.loss_mask, docs, anchors, anchor_valid, offsets)

        def slot_terms(slot_hidden: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Per slot: CE and the draft's argmax (the vocabulary-sized part, in chunks)."""
            logits = project(target_lm_head, slot_hidden).float()
            return F.cross_entropy(logits, tokens, reduction="none"), logits.detach().argmax(-1)

        width = int(self.draft.config.vocab_size)
        slot_weights = torch.exp(-(offsets - 1).float() / self.gamma)
        weights = slot_weights.expand(valid.shape)[valid]
        loss, _, top = weighted_row_chunks(
            slot_terms,
            hidden[valid],
            labels[valid],
            weights=weights,
            scales=(1.0,),
            params=tuple(p for p in target_lm_head.parameters() if p.requires_grad),
            width=width,
        )

        with torch.no_grad():  # a hit is the target's own greedy token, what verification accepts
            rows, blocks, slots = valid.nonzero(as_tuple=True)
            before = anchors[rows, blocks] + offsets[slots] - 1  # slot k's token follows position a + k - 1
            choices = target_choices(target_lm_head, batch.target_last_hidden_states, rows, before, width)
            hits = torch.zeros_like(valid)
            hits[valid] = top == choices
            accuracy, prefix, _ = chain_statistics(hits.flatten(0, 1), valid.flatten(0, 1))
        metrics = {
            "ce": loss,
            **rate_metrics("acc", accuracy),
            **rate_metrics("prefix", prefix),
            "acceptance_length": 1 + prefix.sum(),
            "anchors": anchor_valid.sum(),
        }
        return finish(loss, metrics, valid.sum())
