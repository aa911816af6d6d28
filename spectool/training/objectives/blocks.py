"""Anchored blocks, shared by the DFlash and DSpark objectives: which positions may anchor a block, sampling the
anchors, the block layout of one packed forward, the per-slot labels, and the decay of the slot weights.

Training packs up to ``num_anchors`` blocks per row into ONE draft forward over ``[context features | blocks]``:
block j holds ``[x_a, MASK x (B-1)]`` at rotary positions ``a .. a+B-1`` (per-document positions in packed rows);
it sees the context keys strictly before its anchor in its own document and its own block, nothing else. A block
may run past its document's (or the row's) end: its slots there are simply not supervised.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn

from spectool.drafts import block_position_ids, build_block_attention_mask
from spectool.target import TargetBatch

from .base import Documents, Objective, ObjectiveOutput, map_row_chunks, project, shift_left, uniform

# Published loss decays, keyed by the number of drafted tokens per block: DFlash B = 8, 10, 16 (B - 1 drafts) and
# DSpark B = 7 (B drafts) give (7, 4), (9, 5), (15, 7).
_PUBLISHED_GAMMAS = ((7, 4.0), (9, 5.0), (15, 7.0))


def default_gamma(num_drafts: int) -> float:
    """The weight decay ``gamma`` for blocks that draft ``num_drafts`` tokens: piecewise linear through the published
    points (7, 4), (9, 5), (15, 7), extended linearly with the end slopes (1/2 below 7, 1/3 above 15), so 1 draft
    gets gamma 1 and 31 drafts get 12.3."""
    if num_drafts < 1:
        raise ValueError(f"a block must draft at least one token, got {num_drafts}")
    (n0, g0), (n1, g1), (n2, g2) = _PUBLISHED_GAMMAS
    if num_drafts <= n1:
        return g0 + (g1 - g0) * (num_drafts - n0) / (n1 - n0)
    return g1 + (g2 - g1) * (num_drafts - n1) / (n2 - n1)


def anchor_candidates(loss_mask: torch.Tensor, docs: Documents) -> torch.Tensor:
    """``[B, S]`` bool: positions a that may anchor a block, by the reference rule (SpecForge's and DeepSpec's
    samplers): x_a and x_{a+1} are both labels (``loss_mask[a] and loss_mask[a+1]``), and x_{a+1} lies in a's
    document. A block that runs past its document's or the row's end is cut (`slot_labels` drops its slots there),
    not skipped, so a document's last token is trained at every slot."""
    labels = loss_mask.bool()
    return labels & shift_left(labels, 1, False) & docs.within(1)


def sample_anchors(
    candidates: torch.Tensor, num_anchors: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``num_anchors`` anchors per row, uniformly without replacement among ``candidates`` [B, S].

    Returns ``(anchors [B, A], anchor_valid [B, A])`` with A = min(num_anchors, most candidates in a row), at least
    1. Valid anchors come first in ascending order; rows with fewer candidates end in padding blocks (anchor 0,
    ``anchor_valid`` False). One device sync (for A).
    """
    seq = candidates.shape[1]
    width = max(1, min(int(num_anchors), int(candidates.sum(1).max())))
    keys = uniform(tuple(candidates.shape), generator, candidates.device).masked_fill(~candidates, 2.0)
    picked = keys.topk(width, dim=1, largest=False).indices
    positions = torch.where(candidates.gather(1, picked), picked, seq).sort(dim=1).values
    valid = positions < seq
    return positions.masked_fill(~valid, 0), valid


def block_layout(
    anchors: torch.Tensor,
    anchor_valid: torch.Tensor,
    docs: Documents,
    block_size: int,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary positions ``[B, S + A*B]`` and the boolean attention mask ``[B, 1, A*B, S + A*B]`` of one forward.

    Positions: the context keeps ``position_ids`` (0..S-1 when None); block j slot k sits at the anchor's position
    + k. Mask: ``build_block_attention_mask`` (context strictly before the anchor, the own block bidirectionally,
    padding blocks only themselves), further restricted to context keys of the anchor's own document.
    """
    seq = docs.ids.shape[1]
    anchor_positions = anchors if position_ids is None else position_ids.gather(1, anchors)
    positions = block_position_ids(anchor_positions, seq, block_size)
    if position_ids is not None:
        positions[:, :seq] = position_ids  # packed rows: the context restarts at 0 per document
    mask = build_block_attention_mask(anchors, seq, block_size, anchor_valid)
    query_run = docs.span_end.gather(1, anchors).repeat_interleave(block_size, dim=1)  # [B, A*B]
    own_document = (docs.span_end[:, None, :] == query_run[:, :, None]) & docs.real[:, None, :]
    mask[:, 0, :, :seq] &= own_document
    return positions, mask


def slot_labels(
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    docs: Documents,
    anchors: torch.Tensor,
    anchor_valid: torch.Tensor,
    offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels ``x_{a + offset}`` and their validity ``[B, A, K]`` for the ``offsets`` [K] after each anchor.

    A slot is valid when its block is, and x_{a + offset} lies in the anchor's document and is a label.
    """
    seq = input_ids.shape[1]
    positions = anchors[..., None] + offsets
    inside = positions <= docs.span_end.gather(1, anchors)[..., None]
    anchor_ok = anchor_valid & (docs.ids.gather(1, anchors) >= 0)
    flat = positions.clamp(max=seq - 1).flatten(1)
    labels = input_ids.gather(1, flat).view_as(positions)
    is_label = loss_mask.bool().gather(1, flat).view_as(positions)
    return labels, anchor_ok[..., None] & inside & is_label


@torch.no_grad()
def target_choices(
    lm_head: nn.Module, last_hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, width: int
) -> torch.Tensor:
    """The target's greedy token after each (``rows``, ``positions``) pair: the argmax of its lm_head over the
    post-norm hidden state there (what greedy verification accepts), each distinct position projected once."""
    flat = rows * last_hidden.shape[1] + positions
    unique, inverse = torch.unique(flat, return_inverse=True)
    hidden = last_hidden.flatten(0, 1)[unique]
    (top,) = map_row_chunks(lambda h: (project(lm_head, h).float().argmax(-1),), hidden, width=width)
    return top[inverse]


class BlockObjective(Objective):
    """What the DFlash and DSpark objectives share: anchors drawn per ``anchor_candidates``, then ``loss_at`` those
    anchors. Subclasses set ``block_size`` and ``num_anchors``."""

    block_size: int
    num_anchors: int

    def sample_anchors(
        self,
        batch: TargetBatch,
        *,
        generator: torch.Generator | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(anchors [B, A], anchor_valid [B, A])`` drawn by the rules of step 1 of the method's docstring."""
        docs = Documents.of(batch, document_ids)
        candidates = anchor_candidates(batch.loss_mask, docs)
        return sample_anchors(candidates, self.num_anchors, generator)

    def __call__(
        self,
        batch: TargetBatch,
        *,
        target_lm_head: nn.Module,
        target_embed: nn.Module,
        generator: torch.Generator | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        anchors, anchor_valid = self.sample_anchors(batch, generator=generator, document_ids=document_ids)
        return self.loss_at(
            batch,
            anchors,
            anchor_valid,
            target_lm_head=target_lm_head,
            target_embed=target_embed,
            position_ids=position_ids,
            document_ids=document_ids,
        )

    @abstractmethod
    def loss_at(
        self,
        batch: TargetBatch,
        anchors: torch.Tensor,
        anchor_valid: torch.Tensor,
        *,
        target_lm_head: nn.Module,
        target_embed: nn.Module | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        """The loss and metrics for given anchors ``[B, A]`` (``anchor_valid`` False marks padding blocks)."""
