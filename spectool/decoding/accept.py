"""Lossless acceptance rules for one speculative round.

Greedy: accept the longest prefix of draft tokens that equal the target's argmax, then emit the target's own
token at the first mismatch (or the bonus token after a full accept): the output is exactly the target's
greedy decoding.

Trees (EAGLE-2): the draft only decides which continuations the verify forward precomputes. From the root, the
target chooses its own token at the current node (argmax, or a sample of its processed distribution) and the
walk moves to the child holding that token, if there is one; otherwise that token is emitted and the round ends.
Every emitted token is thus chosen by the target at its true prefix, in both modes.

Chains at temperature > 0: the Leviathan / Chen rule. Draft token d_i, sampled from the draft's
distribution q_i, is accepted when u * q_i(d_i) < p_i(d_i) (u ~ U[0, 1), strict: a token the target gives
probability 0 is never accepted), i.e. with probability min(1, p_i(d_i) / q_i(d_i)); on the first rejection the
emitted token is sampled from normalize(max(p_i - q_i, 0)); after a full accept the bonus token is sampled
from p_{K+1}. Every emitted token then follows the target's distribution p exactly. Both p and q must be the
*processed* distributions (temperature, top-k, top-p) that the target alone and the draft really sample from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from spectool.sampling import MIN_TEMPERATURE, SamplingError, SamplingParams  # noqa: F401 (re-exported)


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampler draws from: softmax(logits / T) restricted to top-k and the top-p nucleus.

    Works on any leading shape; returns float32 probabilities over the last axis. For greedy params this is
    the one-hot of the argmax, so greedy is the T -> 0 limit of the same rule.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does.
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of `probs` ([..., V] -> [...])."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


@dataclass(frozen=True)
class Verdict:
    """The outcome of verifying one chain: how many draft tokens were accepted, and the token the target
    adds after them (the correction at the first mismatch, or the bonus after a full accept)."""

    num_accepted: int
    next_token: int

    @property
    def emitted(self) -> int:
        """Tokens this round adds to the output: the accepted drafts plus the target's token."""
        return self.num_accepted + 1


def accept_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> Verdict:
    """draft_tokens [K], target_logits [K+1, V] (row i scores the token after draft i-1, row 0 after the
    committed prefix)."""
    target_tokens = target_logits.argmax(-1)
    k = draft_tokens.shape[0]
    matches = (draft_tokens == target_tokens[:k]).long()
    n = int(matches.cumprod(0).sum())
    return Verdict(n, int(target_tokens[n]))


def accept_sampling(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> Verdict:
    """Rejection sampling over a chain. draft_tokens [K] were sampled from draft_probs [K, V];
    target_probs [K+1, V] is the target's processed distribution at each of the K+1 positions."""
    k = draft_tokens.shape[0]
    if k:
        index = draft_tokens.unsqueeze(-1)
        p = target_probs[:k].gather(-1, index).squeeze(-1)
        q = draft_probs.gather(-1, index).squeeze(-1)
        u = torch.rand(k, generator=generator, device=target_probs.device)
        # u < p/q without dividing by q; strict, so a token with p(x) = 0 is never accepted, even at u = 0.
        accepted = (u * q < p).long()
        n = int(accepted.cumprod(0).sum())
    else:
        n = 0
    if n < k:
        residual = (target_probs[n] - draft_probs[n]).clamp_min(0)
        total = residual.sum()
        # total == 0 only when p == q, where acceptance was certain; fall back to p for numerical safety.
        dist = residual / total if total > 0 else target_probs[n]
        return Verdict(n, int(sample(dist, generator)))
    return Verdict(n, int(sample(target_probs[k], generator)))


def walk_tree(
    children: dict[int, list[int]], row_tokens: Sequence[int], choose: Callable[[int], int]
) -> tuple[list[int], int]:
    """Descend a verified tree from row 0 (the last committed token).

    ``children[row]`` lists the rows whose parent is ``row``; ``row_tokens[row]`` is the token at that row;
    ``choose(row)`` is the target's token after ``row`` (its argmax, or a sample of its processed distribution).
    Returns (the accepted path's rows, the target's token after the path). Siblings hold distinct tokens, so at
    most one child matches.
    """
    path, current = [], 0
    while True:
        token = choose(current)
        match = next((c for c in children.get(current, []) if row_tokens[c] == token), None)
        if match is None:
            return path, token
        path.append(match)
        current = match
