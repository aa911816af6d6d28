"""EAGLE-3 objective (its paper): training-time test (TTT) with per-step soft cross entropy against the target.

Alignment: position t reads feature t and token x_{t+1} and predicts x_{t+2}. ``draft.ttt_forward`` unrolls
``ttt_steps`` steps: step 0 is teacher-forced, step i feeds the draft its own step i-1 output and reads tokens i
positions further, so step i at position t predicts x_{t+2+i}; its teacher is
``softmax(target_logits[t+1+i, selected_ids])`` in float32, where ``selected_ids`` are the draft vocabulary's
target ids (``draft_to_target(arange(draft_vocab))``, the full vocabulary when unpruned).

Step i's loss ``L_i`` averages the soft CE over the positions where x_{t+2+i} is a label in t's document and (with a
pruned vocabulary) the target's top token at t+1+i is in the draft vocabulary (``loss_mask & t2d[argmax]``).
The total is NeMo's normalised decay ``sum_i step_decay**i * L_i / sum_i step_decay**i`` (SpecForge leaves out the
division; with it the loss scale does not depend on ``ttt_steps``).

Metrics: ``ce@k`` (L_{k-1}); ``acc@k``, the top-1 hit rate of step k-1 (the draft's argmax, mapped to target ids,
against the target's argmax over the FULL vocabulary, so a token outside the draft vocabulary counts as a miss) over
chains whose labels x_{t+2..t+1+k} are all supervised; ``prefix@k``, the rate at which steps 0..k-1 ALL hit over
the same chains; ``acceptance_length = 1 + sum_k prefix@k`` (prefix hits at step k / valid at step k), the simulated
greedy acceptance length (the method's paper).

Also here: ``count_supervised_tokens`` and ``build_draft_vocab`` pick the pruned draft vocabulary (the most frequent
supervised tokens); the trainer passes the ids to ``draft.set_vocab_mapping`` and re-initialises ``lm_head`` from the
target (``draft.init_lm_head_from_target``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from spectool.drafts import LlamaEagle3DraftModel
from spectool.errors import UsageError
from spectool.target import TargetBatch

from .base import (
    Documents,
    Objective,
    ObjectiveOutput,
    chain_statistics,
    check_positive,
    finish,
    project,
    rate_metrics,
    shift_left,
    soft_cross_entropy,
    weighted_mean,
    weighted_row_chunks,
)


def ttt_loss_masks(
    loss_mask: torch.Tensor,
    docs: Documents,
    ttt_steps: int,
    in_draft_vocab: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[ttt_steps, B, S]`` bool: step i, position t is supervised when x_{t+2+i} is a label in t's document and,
    when ``in_draft_vocab`` ([B, S], ``t2d[argmax target_logits]``) is given, the target's top token at t+1+i is in
    the draft vocabulary."""
    labels = loss_mask.bool()
    masks = []
    for step in range(ttt_steps):
        mask = shift_left(labels, 2 + step, False) & docs.within(2 + step)
        if in_draft_vocab is not None:
            mask = mask & shift_left(in_draft_vocab, 1 + step, False)
        masks.append(mask)
    return torch.stack(masks)


class Eagle3Objective(Objective):
    """EAGLE-3 TTT loss for a ``LlamaEagle3DraftModel``; see the module docstring."""

    method = "eagle3"
    draft_class = LlamaEagle3DraftModel
    needs_target_logits = True

    @classmethod
    def prepare_draft(
        cls, draft: LlamaEagle3DraftModel, examples: Sequence[Any], target_lm_head: nn.Module, fresh: bool
    ) -> list[str]:
        """A pruned draft vocabulary: keep the most frequent supervised tokens of the training split (a draft from
        --init keeps its mapping unless it is still the placeholder `spectool init` writes, d2t all zero)."""
        if not draft.pruned_vocab or not (fresh or not bool(draft.d2t.any())):
            return []
        counts = count_supervised_tokens(examples, draft.config.vocab_size)
        draft.set_vocab_mapping(build_draft_vocab(counts, draft.config.draft_vocab_size))
        if not draft.owns_embeddings:
            draft.init_lm_head_from_target(target_lm_head.weight.detach().float().cpu())
        kept = int(counts[draft.draft_to_target(torch.arange(draft.config.draft_vocab_size))].sum())
        share = kept / max(1, int(counts.sum()))
        return [
            f"draft vocabulary: the {draft.config.draft_vocab_size} most frequent supervised tokens "
            f"({share:.1%} of the supervised tokens)"
        ]

    def __init__(self, draft: LlamaEagle3DraftModel, *, ttt_steps: int = 7, step_decay: float = 0.8) -> None:
        super().__init__(draft)
        check_positive("ttt_steps", ttt_steps)
        check_positive("step_decay", step_decay)
        self.ttt_steps = int(ttt_steps)
        self.step_decay = float(step_decay)

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
        """Without ``batch.target_logits`` (capture with ``return_logits=True``), they are computed here with
        ``target_lm_head``. ``generator`` is unused (the loss is deterministic)."""
        draft = self.draft
        if not draft.owns_embeddings and draft.get_input_embeddings() is None:
            draft.attach_target_embeddings(target_embed)
        docs = Documents.of(batch, document_ids)
        with torch.no_grad():
            target_logits = batch.target_logits
            if target_logits is None:
                target_logits = project(target_lm_head, batch.target_last_hidden_states)
            target_tokens = target_logits.argmax(-1)
            selected, in_draft_vocab = None, None
            if draft.pruned_vocab:
                selected = draft.draft_to_target(
                    torch.arange(draft.config.draft_vocab_size, device=target_logits.device)
                )
                in_draft_vocab = draft.t2d[target_tokens]
        loss_masks = ttt_loss_masks(batch.loss_mask, docs, self.ttt_steps, in_draft_vocab)
        chain_masks = ttt_loss_masks(batch.loss_mask, docs, self.ttt_steps)

        out = draft.ttt_forward(
            shift_left(batch.input_ids, 1),
            batch.target_hidden_states,
            ttt_steps=self.ttt_steps,
            attention_mask=docs.causal_mask(),  # causal within each document (packed rows), padding hidden
            position_ids=position_ids,
            return_logits=False,
        )

        def position_terms(
            hidden: torch.Tensor, rows: torch.Tensor, teacher_cols: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            """Per scored position: the soft CE against the target's distribution at ``teacher_cols`` and the
            draft's argmax (the vocabulary-sized part, in chunks)."""
            logits = draft.compute_logits(hidden)
            with torch.no_grad():
                teacher_logits = target_logits[rows, teacher_cols]
                if selected is not None:
                    teacher_logits = teacher_logits[:, selected]
                teacher = torch.softmax(teacher_logits.float(), dim=-1)
            return soft_cross_entropy(logits, teacher), logits.detach().argmax(-1)

        loss, losses, hits = self._step_losses(
            out.hidden_states, chain_masks, loss_masks, position_terms, target_tokens
        )

        accuracy, prefix, _ = chain_statistics(
            torch.stack(hits, dim=-1).flatten(0, 1), chain_masks.permute(1, 2, 0).flatten(0, 1)
        )
        metrics = {
            **rate_metrics("ce", losses),
            **rate_metrics("acc", accuracy),
            **rate_metrics("prefix", prefix),
            "acceptance_length": 1 + prefix.sum(),
        }
        return finish(loss, metrics, loss_masks[0].sum())

    def _step_losses(
        self,
        hidden_states: Sequence[torch.Tensor],
        chain_masks: torch.Tensor,
        loss_masks: torch.Tensor,
        position_terms: Callable[..., tuple[torch.Tensor, torch.Tensor]],
        target_tokens: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """The decayed TTT loss, each step's loss ``L_i`` (detached) and each step's hits ``[B, S]``.

        Every step's scored positions go through the vocabulary in one pass, each chunk's gradient taken in the
        forward pass (no recomputation in backward, one gradient buffer for the head). Logits only where the chain
        is scored: padding and row tails never reach the projection. A row of step i weighs s_i / n_i, with
        s_i = step_decay**i / sum_j step_decay**j and n_i the step's supervised count, so the weighted mean times
        the sum of s_i over steps with a supervised row is sum_i s_i * L_i."""
        draft = self.draft
        decay = [self.step_decay**step for step in range(self.ttt_steps)]
        shares = [d / sum(decay) for d in decay]
        scored = [chain_masks[step].nonzero(as_tuple=True) for step in range(self.ttt_steps)]
        in_loss = [loss_masks[step][rows, cols].float() for step, (rows, cols) in enumerate(scored)]
        counts = [float(mask.sum()) for mask in in_loss]
        heads = (*draft.norm.parameters(), *draft.lm_head.parameters())
        loss, ce, top = weighted_row_chunks(
            position_terms,
            torch.cat([hidden[rows, cols] for hidden, (rows, cols) in zip(hidden_states, scored, strict=True)]),
            torch.cat([rows for rows, _ in scored]),
            torch.cat([cols + 1 + step for step, (_, cols) in enumerate(scored)]),
            weights=torch.cat(
                [mask * (share / n) if n else mask for mask, share, n in zip(in_loss, shares, counts, strict=True)]
            ),
            scales=(sum(share for share, n in zip(shares, counts, strict=True) if n),),
            params=tuple(p for p in heads if p.requires_grad),
            width=int(draft.config.draft_vocab_size),
        )
        step_losses, hits = [], []
        sizes = [rows.shape[0] for rows, _ in scored]
        with torch.no_grad():
            steps = zip(scored, in_loss, ce.split(sizes), top.split(sizes), strict=True)
            for step, ((rows, cols), mask, step_ce, step_top) in enumerate(steps):
                step_losses.append(weighted_mean(step_ce, mask))
                hit = torch.zeros_like(chain_masks[step])
                hit[rows, cols] = draft.draft_to_target(step_top) == target_tokens[rows, cols + 1 + step]
                hits.append(hit)
        return loss, torch.stack(step_losses), hits


# ----------------------------------------------------------------------------------------------------------
# Draft vocabulary (pruning)
# ----------------------------------------------------------------------------------------------------------


def count_supervised_tokens(batches: Iterable[Any], vocab_size: int) -> torch.Tensor:
    """``[vocab_size]`` int64 counts of the label tokens (``loss_mask`` 1) over ``(input_ids, loss_mask)`` pairs or
    batch objects with ``input_ids`` / ``loss_mask`` attributes."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for item in batches:
        input_ids, loss_mask = (item.input_ids, item.loss_mask) if hasattr(item, "input_ids") else item
        tokens = torch.as_tensor(input_ids)[torch.as_tensor(loss_mask).bool()].cpu()
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
            raise UsageError(f"token ids must lie in [0, {vocab_size}); the data does not fit this target")
        counts += torch.bincount(tokens, minlength=vocab_size)
    return counts


def build_draft_vocab(token_counts: torch.Tensor, draft_vocab_size: int) -> torch.Tensor:
    """Ascending target ids of the ``draft_vocab_size`` most frequent tokens; ties go to the lower id, and tokens
    never seen fill the remaining places by lowest id."""
    counts = torch.as_tensor(token_counts).flatten().cpu()
    if not 0 < draft_vocab_size <= counts.numel():
        raise UsageError(
            f"draft_vocab_size must be in [1, {counts.numel()}] (the target vocabulary), got {draft_vocab_size}"
        )
    order = torch.sort(counts, descending=True, stable=True).indices
    return order[:draft_vocab_size].sort().values
