"""What every training objective shares: its output, its base class, and the tensor helpers for documents, shifts,
weighted means and acceptance statistics.

Conventions of all objectives:

* ``loss_mask[b, j] = 1`` says token x_j is a label: a token the draft must learn to predict.
* A row holds one or more documents. Packed rows come with ``document_ids`` [B, S] (-1 on padding) and
  ``position_ids`` that restart at 0 per document; without them a row is one document padded per
  ``attention_mask``. No label, teacher position, shift or block ever leaves the contiguous run of its document.
* The loss math (softmax, cross entropy, L1, BCE) runs in float32 whatever the model dtype or autocast.
* Vocabulary-sized work (logits, softmaxes, their gradients) goes through `map_row_chunks` (recomputed in the
  backward pass) or `weighted_row_chunks` (the gradient taken chunk by chunk in the forward pass, for losses that
  are fixed weighted means of per-row terms): at most ``VOCAB_CHUNK_ELEMENTS`` rows x vocabulary floats at a time,
  so a 150k-token vocabulary over tens of thousands of supervised positions never sits in memory whole.
* ``acceptance_length`` counts the bonus token: it estimates the tokens emitted per target verify forward
  (what greedy verification accepts), 1 for a useless draft.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from spectool.errors import UsageError
from spectool.target import TargetBatch


@dataclass
class ObjectiveOutput:
    """One objective evaluation: ``loss`` (scalar, with grad), ``metrics`` (plain floats for logging: the loss, its
    components, ``acc@k``, ``acceptance_length`` and method-specific diagnostics) and ``num_supervised`` (how many
    predictions the loss averages over)."""

    loss: torch.Tensor
    metrics: dict[str, float]
    num_supervised: int
    # DSpark with a confidence head: (confidence logits, greedy hits, supervised), each [blocks, K], detached;
    # what `spectool.decoding.draft_length.calibrate_temperatures` fits the scheduler's temperatures on.
    calibration: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class Objective(ABC):
    """A training objective for one draft family, called once per batch of target features.

    ``target_layer_ids`` and ``needs_target_logits`` tell the trainer what to capture:
    ``FrozenTarget(target, objective.target_layer_ids).capture(..., return_logits=objective.needs_target_logits)``.
    """

    method: ClassVar[str]
    draft_class: ClassVar[type[nn.Module]]
    needs_target_logits: ClassVar[bool] = False

    def __init__(self, draft: nn.Module) -> None:
        if not isinstance(draft, self.draft_class):
            raise UsageError(
                f"the {self.method} objective trains a {self.draft_class.__name__}, got {type(draft).__name__}"
            )
        self.draft = draft

    @property
    def target_layer_ids(self) -> list[int]:
        """The target layers whose outputs the draft reads (empty: only the post-norm last hidden state)."""
        return list(getattr(self.draft.config, "target_layer_ids", None) or [])

    @classmethod
    def prepare_draft(
        cls, draft: nn.Module, examples: Sequence[Any], target_lm_head: nn.Module, fresh: bool
    ) -> list[str]:
        """Data-dependent setup of a draft before its first training step (``fresh``: a new draft, not one from
        --init); returns notes to show. Nothing by default."""
        return []

    @abstractmethod
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
        """The loss and metrics of ``batch``; ``generator`` drives all randomness (noise, anchors)."""


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise UsageError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, got {value}")


# ----------------------------------------------------------------------------------------------------------
# Documents and shifts
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Documents:
    """Which document each token belongs to: ``ids`` [B, S] (-1 on padding) and ``span_end`` [B, S], the last index
    of the contiguous run of the position's document. A span t..t+n stays inside one document (hence inside the row,
    never on padding) exactly when ``ids[t] >= 0`` and ``t + n <= span_end[t]``."""

    ids: torch.Tensor
    span_end: torch.Tensor

    @classmethod
    def of(cls, batch: TargetBatch, document_ids: torch.Tensor | None = None) -> Documents:
        """From ``document_ids`` (packed rows) or, when None, one document per row padded per ``attention_mask``."""
        input_ids = batch.input_ids
        if batch.attention_mask is not None:
            real = batch.attention_mask.to(input_ids.device).bool()
        else:
            real = torch.ones_like(input_ids, dtype=torch.bool)
        if document_ids is None:
            ids = torch.where(real, 0, -1)
        else:
            ids = document_ids.to(input_ids.device, torch.long).masked_fill(~real, -1)
        batch_size, seq = ids.shape
        starts = torch.ones_like(ids, dtype=torch.bool)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
        run = starts.long().cumsum(1) - 1
        index = torch.arange(seq, device=ids.device).expand(batch_size, seq)
        ends = torch.zeros_like(run).scatter_reduce(1, run, index, reduce="amax", include_self=False)
        return cls(ids=ids, span_end=ends.gather(1, run))

    @property
    def real(self) -> torch.Tensor:
        return self.ids >= 0

    def within(self, shift: int) -> torch.Tensor:
        """``[B, S]`` bool: positions t..t+shift all lie in t's document."""
        positions = torch.arange(self.ids.shape[1], device=self.ids.device)
        return self.real & (positions + shift <= self.span_end)

    def is_packed(self) -> bool:
        """Whether some row holds more than one document (one device sync)."""
        ids = self.ids
        changes = (ids[:, 1:] != ids[:, :-1]) & (ids[:, 1:] >= 0) & (ids[:, :-1] >= 0)
        return bool(changes.any())

    def causal_mask(self) -> torch.Tensor:
        """Boolean ``[B, 1, S, S]``: query t sees keys j <= t of its own document run; every query keeps its own
        key, so no attention row is fully masked (padding rows included)."""
        seq = self.ids.shape[1]
        positions = torch.arange(seq, device=self.ids.device)
        causal = positions[None, :] <= positions[:, None]
        same_run = self.span_end[:, :, None] == self.span_end[:, None, :]
        mask = causal & same_run & self.real[:, :, None]
        return (mask | torch.eye(seq, dtype=torch.bool, device=self.ids.device))[:, None]


def shift_left(x: torch.Tensor, shift: int, fill: float | bool = 0) -> torch.Tensor:
    """``x[:, t + shift]`` at position t (dim 1), ``fill`` past the end."""
    if shift == 0:
        return x
    tail = x.new_full((x.shape[0], min(shift, x.shape[1]), *x.shape[2:]), fill)
    return torch.cat((x[:, shift:], tail), dim=1)


def uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U[0, 1) float32 samples drawn with ``generator`` (on its own device), returned on ``device``."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


# ----------------------------------------------------------------------------------------------------------
# Loss math (float32)
# ----------------------------------------------------------------------------------------------------------


def project(lm_head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``lm_head(hidden)`` with ``hidden`` cast to the head's dtype (a bf16 target may serve an fp32 draft)."""
    weight = getattr(lm_head, "weight", None)
    return lm_head(hidden.to(weight.dtype) if isinstance(weight, torch.Tensor) else hidden)


#: The most rows x vocabulary elements that `map_row_chunks` lets one chunk materialise (256 MiB in float32).
VOCAB_CHUNK_ELEMENTS = 1 << 26


def map_row_chunks(
    fn: Callable[..., tuple[torch.Tensor, ...]], *rows: torch.Tensor, width: int
) -> tuple[torch.Tensor, ...]:
    """``fn(*rows)`` computed over chunks of rows and concatenated: ``fn`` maps row-aligned inputs (first
    dimension n) to a tuple of row-aligned outputs and builds ``[chunk, width]`` intermediates (``width`` = the
    vocabulary). When the whole does not exceed ``VOCAB_CHUNK_ELEMENTS`` it is one call; otherwise each chunk
    runs under activation checkpointing when gradients are on, so the backward pass keeps only the inputs and
    ``fn``'s outputs and recomputes one chunk's intermediates at a time. Results equal the single call's (up to
    float summation order in the weight gradients)."""
    total = rows[0].shape[0]
    chunk = max(1, VOCAB_CHUNK_ELEMENTS // max(1, width))
    if total <= chunk:
        return fn(*rows)
    parts = []
    for start in range(0, total, chunk):
        piece = [row[start : start + chunk] for row in rows]
        parts.append(checkpoint(fn, *piece, use_reentrant=False) if torch.is_grad_enabled() else fn(*piece))
    return tuple(torch.cat(outputs) for outputs in zip(*parts, strict=True))


class _GradientInForward(torch.autograd.Function):
    """``sum_j scales[j] * weighted_mean(fn(*rows)[j], weights)`` whose gradients (to the rows and ``params``) are
    taken chunk by chunk during the forward pass; backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, fn, weights, scales, num_rows, width, *inputs):  # type: ignore[override]
        rows, params = inputs[:num_rows], inputs[num_rows:]
        needs = ctx.needs_input_grad[5:]
        coefficient = weights.detach().float() / weights.detach().float().sum().clamp_min(
            torch.finfo(torch.float32).tiny
        )
        total = rows[0].shape[0]
        chunk = max(1, VOCAB_CHUNK_ELEMENTS // max(1, width))
        row_grads = [torch.zeros_like(row) if need else None for row, need in zip(rows, needs, strict=False)]
        param_grads: list[torch.Tensor | None] = [None] * len(params)
        loss = torch.zeros((), dtype=torch.float32, device=coefficient.device)
        parts = []
        for start in range(0, total, chunk):
            stop = min(total, start + chunk)
            with torch.enable_grad():
                piece = [
                    row[start:stop].detach().requires_grad_(bool(need)) for row, need in zip(rows, needs, strict=False)
                ]
                outputs = fn(*piece)
                weight = coefficient[start:stop]
                chunk_loss = sum(
                    scale * (weight * term.float()).sum() for scale, term in zip(scales, outputs, strict=False)
                )
                wanted = [p for p, need in zip(piece, needs, strict=False) if need]
                wanted += [p for p, need in zip(params, needs[num_rows:], strict=True) if need]
                if wanted and chunk_loss.requires_grad:
                    grads = iter(torch.autograd.grad(chunk_loss, wanted, allow_unused=True))
                    for index, need in enumerate(needs[:num_rows]):
                        if need and (grad := next(grads)) is not None:
                            row_grads[index][start:stop] = grad
                    for index, need in enumerate(needs[num_rows:]):
                        if need and (grad := next(grads)) is not None:
                            previous = param_grads[index]
                            param_grads[index] = grad if previous is None else previous + grad
            loss = loss + chunk_loss.detach()
            parts.append(tuple(output.detach() for output in outputs))
        ctx.grads = (
            row_grads
            + [
                (torch.zeros_like(p) if grad is None else grad) if need else None  # every parameter gets a gradient
                for p, grad, need in zip(params, param_grads, needs[num_rows:], strict=True)
            ]
        )
        if parts:
            stitched = tuple(torch.cat(outputs) for outputs in zip(*parts, strict=True))
        else:
            stitched = tuple(fn(*(row[:0] for row in rows)))
            stitched = tuple(output.detach() for output in stitched)
        ctx.mark_non_differentiable(*stitched)
        return (loss, *stitched)

    @staticmethod
    def backward(ctx, grad_loss, *_):  # type: ignore[override]
        grads = [None if grad is None else grad * grad_loss.to(grad.dtype) for grad in ctx.grads]
        ctx.grads = None
        return (None, None, None, None, None, *grads)


def weighted_row_chunks(
    fn: Callable[..., tuple[torch.Tensor, ...]],
    *rows: torch.Tensor,
    weights: torch.Tensor,
    scales: tuple[float, ...],
    params: tuple[torch.Tensor, ...] = (),
    width: int,
) -> tuple[torch.Tensor, ...]:
    """``(loss, *outputs)``: ``fn(*rows)`` over chunks of at most ``VOCAB_CHUNK_ELEMENTS // width`` rows, as
    `map_row_chunks`, for a loss that is a fixed weighted mean of its first outputs:
    ``loss = sum_j scales[j] * weighted_mean(outputs[j], weights)`` (``weights`` [n], no gradient).

    With gradients on, each chunk's gradient (to the rows that require one and to ``params``, the parameters
    ``fn`` reads that require one) is taken right after the chunk's forward and its vocabulary-sized
    intermediates are freed: one forward and one backward of the vocabulary work per row, no recomputation.
    The backward pass only scales the stored gradients. ``outputs`` come back detached. Values and gradients
    equal those of ``weighted_mean`` on one ``fn`` call (up to float summation order)."""
    if not torch.is_grad_enabled():
        outputs = map_row_chunks(fn, *rows, width=width)
        loss = sum(scale * weighted_mean(term, weights) for scale, term in zip(scales, outputs, strict=False))
        return (loss, *outputs)
    return _GradientInForward.apply(fn, weights, scales, len(rows), width, *rows, *params)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(w * v) / sum(w)``; 0 (with a graph, no NaN) when every weight is 0 or nothing is selected."""
    weights = weights.to(torch.float32)
    total = weights.sum().clamp_min(torch.finfo(torch.float32).tiny)
    return (values.float() * weights).sum() / total


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """``-sum_v p(v) log softmax(logits)(v)`` per row, in float32."""
    return -(target_probs.float() * F.log_softmax(logits.float(), dim=-1)).sum(-1)


# ----------------------------------------------------------------------------------------------------------
# Acceptance statistics
# ----------------------------------------------------------------------------------------------------------


def chain_statistics(hits: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position rates of draft chains/blocks ``[N, K]`` (position k = the k-th drafted token).

    A position counts only when it and every earlier one of its chain is valid (``chain_valid``). Returns
    ``(accuracy [K], prefix_accuracy [K], counts [K])``: the top-1 hit rate at k, the rate at which positions
    1..k ALL hit (what greedy verification accepts), and the number of chains valid through k. The simulated
    acceptance length is ``1 + prefix_accuracy.sum()`` (the bonus token included).
    """
    chain_valid = valid.long().cumprod(-1).bool()
    prefix_hits = (hits & valid).long().cumprod(-1).bool()
    counts = chain_valid.sum(0)
    denominator = counts.clamp_min(1).float()
    accuracy = (hits & chain_valid).sum(0).float() / denominator
    return accuracy, prefix_hits.sum(0).float() / denominator, counts


def expected_prefix_survival(accept: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[K]``: mean over chains valid through k of ``prod_{j<=k} accept_j`` (the probability that drafts 1..k are
    all accepted); ``1 + sum`` is the expected acceptance length under rejection sampling."""
    chain_valid = valid.long().cumprod(-1).bool()
    survival = torch.where(chain_valid, accept.float(), 0.0).cumprod(-1)
    return (survival * chain_valid).sum(0) / chain_valid.sum(0).clamp_min(1).float()


def rate_metrics(name: str, rates: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name@1: rates[0], name@2: rates[1], ...}``."""
    return {f"{name}@{k + 1}": rate for k, rate in enumerate(rates)}


def finish(loss: torch.Tensor, metrics: dict[str, torch.Tensor], num_supervised: torch.Tensor) -> ObjectiveOutput:
    """Turn tensor metrics into floats with a single device sync."""
    values = [loss.detach().double().reshape(()), num_supervised.detach().double().reshape(())]
    values += [m.detach().double().reshape(()).to(loss.device) for m in metrics.values()]
    floats = torch.stack(values).tolist()
    return ObjectiveOutput(
        loss=loss,
        metrics={"loss": floats[0], **dict(zip(metrics, floats[2:], strict=True))},
        num_supervised=int(floats[1]),
    )
