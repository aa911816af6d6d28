"""DSpark objective (its paper): the DFlash backbone, every slot a prediction, distilled towards the target with a
Markov head and a confidence head.

1. Anchors as DFlash (``blocks.anchor_candidates``: x_a and x_{a+1} labels of one document), so every valid block
   supervises at least its first slot; a block running past its document's (or the row's) end is cut there.
2. One forward over ``[context features | all blocks]``, blocks ``[x_a, MASK x (B-1)]`` embedded with the draft's
   frozen copy of the target embedding.
3. Slot k = 0..B-1 predicts x_{a+k+1}. Its logits are teacher-forced through the Markov head:
   ``draft_logits(h_k, prev_k)`` with prev_k = x_{a+k} (the anchor for slot 0). Supervision is the contiguous prefix
   ``eval_mask = cumprod(valid)``, valid = x_{a+k+1} a label in the anchor's document. The teacher for slot k is
   ``softmax(target_lm_head(target_last_hidden_states[a+k]))`` = p_target(x_{a+k+1} | x_{<=a+k}), float32, no grad.
4. With ``w_k = eval_mask * exp(-k/gamma)`` and every mean ``sum w * term / sum w``:
   ``CE`` = cross entropy with x_{a+k+1}; ``L1 = ||softmax(draft) - teacher||_1`` (2 x total variation);
   ``accept_k = clamp(1 - L1_k/2, 0, 1)`` (= sum_v min(p, q), the probability that rejection sampling accepts
   the slot); ``CONF = BCEWithLogits(confidence_logit_k, accept_k.detach())``;
   ``loss = ce_weight*CE + l1_weight*L1 + confidence_weight*CONF`` (0.1 / 0.9 / 1.0; CONF is left out when the
   draft has no confidence head). ``gamma`` defaults to ``blocks.default_gamma(B)``: the published 4 for B = 7,
   and the same rule in the number of drafted tokens as DFlash (B drafts here, B-1 there).

Metrics (draft position k = slot k-1, k = 1..B): ``ce``, ``l1``, ``conf``; ``accept_rate@k`` (mean accept_k over the
supervised slots); over blocks supervised through k, ``acc@k`` (slot k's argmax is the teacher's, the target's
own greedy token: what verification accepts, as every method scores a hit) and
``prefix@k`` (greedy prefix hits: slots up to k all are); ``acceptance_length`` = 1 + sum_k prefix@k, the greedy
acceptance length as every method reports it; ``sampled_acceptance_length`` = 1 + sum_k E[prod_{j<=k} accept_j],
the expected acceptance length under rejection sampling at temperature 1, each term averaged over the blocks
supervised through k; ``anchors``, the valid blocks. (Before prefix@k, ``acceptance_length`` was the sampled one and
``greedy_acceptance_length`` the greedy one; `spectool report` reads such runs in today's names.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spectool.drafts import Qwen3DSparkModel, block_input_ids, teacher_forced_prev_tokens
from spectool.target import TargetBatch

from .base import (
    Documents,
    ObjectiveOutput,
    chain_statistics,
    check_positive,
    expected_prefix_survival,
    finish,
    project,
    rate_metrics,
    weighted_mean,
    weighted_row_chunks,
)
from .blocks import BlockObjective, block_layout, default_gamma, slot_labels


class DSparkObjective(BlockObjective):
    """DSpark training loss for a ``Qwen3DSparkModel``; see the module docstring."""

    method = "dspark"
    draft_class = Qwen3DSparkModel
    needs_target_logits = False

    def __init__(
        self,
        draft: Qwen3DSparkModel,
        *,
        num_anchors: int | None = None,
        gamma: float | None = None,
        ce_weight: float = 0.1,
        l1_weight: float = 0.9,
        confidence_weight: float = 1.0,
    ) -> None:
        """``num_anchors`` defaults to the draft config's (512 upstream)."""
        super().__init__(draft)
        self.block_size = int(draft.config.block_size)
        self.num_anchors = int(num_anchors if num_anchors is not None else draft.config.num_anchors)
        self.gamma = float(gamma) if gamma is not None else default_gamma(self.block_size)
        self.ce_weight, self.l1_weight, self.confidence_weight = ce_weight, l1_weight, confidence_weight
        check_positive("num_anchors", self.num_anchors)
        check_positive("gamma", self.gamma)
        for name in ("ce_weight", "l1_weight", "confidence_weight"):
            check_positive(name, getattr(self, name), allow_zero=True)

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
        """Steps 2-4 for given anchors ``[B, A]`` (``anchor_valid`` False marks padding blocks). ``target_embed`` is
        unused: DSpark embeds with its own frozen copy, as it does when decoding."""
        draft, block = self.draft, self.block_size
        docs = Documents.of(batch, document_ids)
        input_ids = batch.input_ids
        block_ids = block_input_ids(input_ids.gather(1, anchors), block, draft.config.mask_token_id)
        positions, mask = block_layout(anchors, anchor_valid, docs, block, position_ids)
        hidden = draft(block_ids, target_hidden=batch.target_hidden_states, position_ids=positions, attention_mask=mask)
        hidden = hidden.view(*anchors.shape, block, hidden.shape[-1])

        offsets = torch.arange(block, device=anchors.device)
        labels, valid = slot_labels(input_ids, batch.loss_mask, docs, anchors, anchor_valid, offsets + 1)
        eval_mask = valid.long().cumprod(-1).bool()
        prev = teacher_forced_prev_tokens(input_ids, anchors, block).view_as(labels)[eval_mask]
        rows, blocks, slots = eval_mask.nonzero(as_tuple=True)
        teacher_hidden = batch.target_last_hidden_states[rows, anchors[rows, blocks] + slots].detach()
        slot_hidden = hidden[eval_mask]
        target_tokens = labels[eval_mask]

        def slot_terms(
            slot_hidden: torch.Tensor, prev: torch.Tensor, tokens: torch.Tensor, teacher_hidden: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """Per slot: CE, L1 to the teacher, and the draft's argmax (the vocabulary-sized part, in chunks)."""
            log_q = F.log_softmax(draft.draft_logits(slot_hidden, prev).float(), dim=-1)
            ce = F.nll_loss(log_q, tokens, reduction="none")
            with torch.no_grad():
                teacher = torch.softmax(project(target_lm_head, teacher_hidden).float(), dim=-1)
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.l1_weight > 0):  # no backward of a 0 term
                l1 = (log_q.exp() - teacher).abs().sum(-1)
            return ce, l1, log_q.detach().argmax(-1), teacher.argmax(-1)

        width = int(draft.config.vocab_size)
        weights = torch.exp(-offsets.float() / self.gamma).expand(eval_mask.shape)[eval_mask]
        heads = (*draft.lm_head.parameters(), *draft.markov_head.parameters())
        loss, ce, l1, top, teacher_top = weighted_row_chunks(
            slot_terms,
            slot_hidden,
            prev,
            target_tokens,
            teacher_hidden,
            weights=weights,
            scales=(self.ce_weight, self.l1_weight),
            params=tuple(p for p in heads if p.requires_grad),
            width=width,
        )
        accept = (1 - l1 / 2).clamp(0, 1)
        metrics = {"ce": weighted_mean(ce, weights), "l1": weighted_mean(l1, weights)}
        if draft.config.enable_confidence_head:
            confidence = draft.confidence_logits(slot_hidden, prev).float()
            bce = F.binary_cross_entropy_with_logits(confidence, accept.detach(), reduction="none")
            metrics["conf"] = weighted_mean(bce, weights)
            loss = loss + self.confidence_weight * metrics["conf"]

        with torch.no_grad():
            per_slot_accept = torch.zeros(eval_mask.shape, device=accept.device)
            per_slot_accept[eval_mask] = accept
            hits = torch.zeros_like(eval_mask)
            hits[eval_mask] = top == teacher_top  # the target's greedy token: what verification accepts
            flat_mask = eval_mask.flatten(0, 1)
            supervised = flat_mask.sum(0).clamp_min(1)
            accuracy, prefix, _ = chain_statistics(hits.flatten(0, 1), flat_mask)
            survival = expected_prefix_survival(per_slot_accept.flatten(0, 1), flat_mask)
        metrics.update(rate_metrics("accept_rate", per_slot_accept.flatten(0, 1).sum(0) / supervised))
        metrics.update(rate_metrics("acc", accuracy))
        metrics.update(rate_metrics("prefix", prefix))
        metrics["acceptance_length"] = 1 + prefix.sum()
        metrics["sampled_acceptance_length"] = 1 + survival.sum()
        metrics["anchors"] = anchor_valid.sum()
        output = finish(loss, metrics, eval_mask.sum())
        if draft.config.enable_confidence_head:
            logits = torch.zeros(eval_mask.shape, device=confidence.device)
            logits[eval_mask] = confidence.detach()
            output.calibration = (logits.flatten(0, 1), hits.flatten(0, 1), flat_mask)
        return output
