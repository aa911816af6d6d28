"""EAGLE-1/2 objective (the EAGLE paper; EAGLE-2 trains identically): regress the target's next feature and distil its
next-token distribution through the target's lm_head.

Alignment: draft position t reads token x_{t+1} and the target's post-norm last hidden state f_t (plus uniform
noise U(-feature_noise, feature_noise) in training mode, drawn from ``generator``) and predicts f_{t+1}.
``lm_head(f_{t+1})`` is the target's distribution of x_{t+2}, so position t is supervised when x_{t+2} is a label
(``loss_mask``) in t's document. Over the supervised positions:

    loss = regression_weight * SmoothL1(pred, f_{t+1})
         + distill_weight * softCE(lm_head(pred), softmax(lm_head(f_{t+1})))

SmoothL1 has beta 1 and is averaged over the hidden dimension; both terms are averaged over supervised positions.
The teacher ``lm_head(f_{t+1})`` equals the target's logits at t+1; it is computed here for the supervised rows only,
so no full ``[B, S, V]`` target logits are needed.

Metrics: ``smooth_l1``, ``soft_ce``; ``acc@k`` and ``acceptance_length`` from a simulated greedy chain of
``chain_steps`` drafts, unrolled without gradient the way the decoder runs it: step i >= 1 feeds the draft its own
step i-1 prediction and the token x_{t+1+i}, attends to the step-0 keys of its document up to t plus its own chain's
keys (a KV cache), at rotary position t + i. Draft k hits when ``argmax lm_head(pred)`` equals the target's argmax
at t+k; ``acc@k`` is that rate over chains whose labels x_{t+2..t+1+k} are all supervised, ``prefix@k`` the rate at
which drafts 1..k ALL hit over the same chains, and ``acceptance_length = 1 + sum_k prefix@k``. Ground-truth tokens
stand in for the draft's own tokens, which they equal along a hit prefix when the data is the target's own greedy
output. ``chain_steps=1`` reports ``1 + acc@1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spectool.drafts import DraftKVCache, LlamaEagleDraftModel
from spectool.target import TargetBatch

from .base import (
    Documents,
    Objective,
    ObjectiveOutput,
    chain_statistics,
    check_positive,
    finish,
    map_row_chunks,
    project,
    rate_metrics,
    shift_left,
    soft_cross_entropy,
    uniform,
    weighted_mean,
    weighted_row_chunks,
)


class Eagle1Objective(Objective):
    """EAGLE-1/2 training loss for a ``LlamaEagleDraftModel``; see the module docstring."""

    method = "eagle1"
    draft_class = LlamaEagleDraftModel
    needs_target_logits = False

    def __init__(
        self,
        draft: LlamaEagleDraftModel,
        *,
        regression_weight: float = 1.0,
        distill_weight: float = 0.1,
        feature_noise: float = 0.1,
        chain_steps: int = 4,
    ) -> None:
        super().__init__(draft)
        check_positive("regression_weight", regression_weight, allow_zero=True)
        check_positive("distill_weight", distill_weight, allow_zero=True)
        check_positive("feature_noise", feature_noise, allow_zero=True)
        check_positive("chain_steps", chain_steps)
        self.regression_weight = regression_weight
        self.distill_weight = distill_weight
        self.feature_noise = feature_noise
        self.chain_steps = int(chain_steps)

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
        draft = self.draft
        features = batch.target_last_hidden_states
        docs = Documents.of(batch, document_ids)
        batch_size, seq = docs.ids.shape
        if position_ids is None:
            position_ids = torch.arange(seq, device=features.device).expand(batch_size, seq)
        inputs = features
        if draft.training and self.feature_noise > 0:
            noise = uniform(tuple(features.shape), generator, features.device) * 2 - 1
            inputs = features + (self.feature_noise * noise).to(features.dtype)

        # Step 0, teacher-forced: position t reads x_{t+1} and f_t, attends within its document, predicts f_{t+1}.
        step0_mask = docs.causal_mask()
        cache = draft.new_cache()
        predicted = draft(
            shift_left(batch.input_ids, 1),
            hidden_states=inputs,
            position_ids=position_ids,
            attention_mask=step0_mask,
            past_key_values=cache,
        )
        labels = batch.loss_mask.bool()
        supervised = shift_left(labels, 2, False) & docs.within(2)
        rows, cols = supervised.nonzero(as_tuple=True)
        pred = predicted[rows, cols]
        target = features[rows, cols + 1]
        smooth_l1 = F.smooth_l1_loss(pred.float(), target.float(), reduction="none").mean(-1)

        def position_terms(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Per position: the soft CE against the target's distribution and whether the draft's argmax is the
            target's (the vocabulary-sized part, in chunks)."""
            with torch.no_grad():
                teacher_logits = project(target_lm_head, target).float()
            draft_logits = project(target_lm_head, pred)
            soft_ce = soft_cross_entropy(draft_logits, torch.softmax(teacher_logits, dim=-1))
            return soft_ce, draft_logits.detach().argmax(-1) == teacher_logits.argmax(-1)

        ones = torch.ones_like(smooth_l1)
        distill, soft_ce, first_hit = weighted_row_chunks(  # each chunk's gradient taken in the forward pass
            position_terms,
            pred,
            target,
            weights=ones,
            scales=(self.distill_weight,),
            params=tuple(p for p in target_lm_head.parameters() if p.requires_grad),
            width=int(draft.config.vocab_size),
        )
        smooth_l1_mean, soft_ce_mean = weighted_mean(smooth_l1, ones), weighted_mean(soft_ce, ones)
        loss = self.regression_weight * smooth_l1_mean + distill

        with torch.no_grad():
            first_hits = torch.zeros_like(supervised)
            first_hits[rows, cols] = first_hit
            hits, valid = self._simulate_chain(
                predicted.detach(), first_hits, supervised, batch, docs, position_ids, step0_mask, target_lm_head, cache
            )
            accuracy, prefix, _ = chain_statistics(hits.flatten(0, 1), valid.flatten(0, 1))
        metrics = {
            "smooth_l1": smooth_l1_mean,
            "soft_ce": soft_ce_mean,
            **rate_metrics("acc", accuracy),
            **rate_metrics("prefix", prefix),
            "acceptance_length": 1 + prefix.sum(),
        }
        return finish(loss, metrics, supervised.sum())

    def _simulate_chain(
        self,
        predicted: torch.Tensor,
        first_hits: torch.Tensor,
        supervised: torch.Tensor,
        batch: TargetBatch,
        docs: Documents,
        position_ids: torch.Tensor,
        step0_mask: torch.Tensor,
        target_lm_head: nn.Module,
        cache: DraftKVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hits and validity ``[B, S, chain_steps]`` of the greedy chain started at every position (no grad)."""
        draft = self.draft
        features = batch.target_last_hidden_states
        labels = batch.loss_mask.bool()
        seq = supervised.shape[1]
        diagonal = torch.eye(seq, dtype=torch.bool, device=supervised.device).expand_as(step0_mask)
        hits, valid = [first_hits], [supervised]
        chain_valid = supervised

        def argmaxes(*hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(project(target_lm_head, h).argmax(-1) for h in hidden)

        for step in range(1, self.chain_steps):
            masks = [step0_mask] + [diagonal] * step  # step-0 keys causally, then each chain step's own key
            predicted = draft(
                shift_left(batch.input_ids, 1 + step),
                hidden_states=predicted,
                position_ids=position_ids + step,
                attention_mask=torch.cat(masks, dim=-1),
                past_key_values=cache,
            )
            step_valid = shift_left(labels, 2 + step, False) & docs.within(2 + step)
            chain_valid = chain_valid & step_valid
            rows, cols = chain_valid.nonzero(as_tuple=True)
            drafted, wanted = map_row_chunks(
                argmaxes, predicted[rows, cols], features[rows, cols + 1 + step], width=int(draft.config.vocab_size)
            )
            step_hits = torch.zeros_like(supervised)
            step_hits[rows, cols] = drafted == wanted
            hits.append(step_hits)
            valid.append(step_valid)
        return torch.stack(hits, dim=-1), torch.stack(valid, dim=-1)
