"""Proposers: how each draft method turns the committed context into draft tokens for one round.

A proposer keeps its own state (draft KV cache, pending target features) in step with the engine through two
calls: `extend_context(features)` with the target features of newly committed positions, and
`propose(last_token, ...)` for the next round's drafts. Draft tokens are greedy at temperature 0 and sampled
from the draft's processed distribution otherwise, whose probabilities go with them for rejection sampling.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from spectool.decoding.accept import SamplingParams, probabilities, sample

if TYPE_CHECKING:
    from spectool.decoding.schedule import PrefixScheduler


@dataclass
class Proposal:
    """Draft tokens [k] and, when sampling, the distributions [k, V] they were drawn from."""

    tokens: torch.Tensor
    probs: torch.Tensor | None = None
    parents: list[int] | None = None  # EAGLE-2 tree: parent index of each token (-1 = the last committed token)

    @classmethod
    def empty(cls, device: torch.device) -> Proposal:
        return cls(torch.empty(0, dtype=torch.long, device=device))


class Proposer(ABC):
    """The draft side of the engine."""

    #: the most tokens one round can draft
    max_drafts: int
    #: nodes of the tree a round drafts (EAGLE-2), None for a chain or a block
    tree_size: int | None = None
    #: whether drafting k tokens costs k draft forwards (a chain) rather than one (a block, a tree layer per level)
    per_token_drafting: bool = False

    @abstractmethod
    def reset(self) -> None:
        """Forget the previous generation."""

    @abstractmethod
    def extend_context(self, features: torch.Tensor) -> None:
        """Target features [1, n, K*H] of the next n committed positions, in order."""

    @abstractmethod
    def propose(self, last_token: int, sampling: SamplingParams, generator: torch.Generator, limit: int) -> Proposal:
        """Draft up to `limit` tokens after the committed `last_token` (whose features are not known yet)."""


def draw(
    logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Greedy argmax, or a sample with its processed distribution, for each row of `logits` [..., V]."""
    if sampling.greedy:
        return logits.argmax(-1), None
    probs = probabilities(logits, sampling)
    return sample(probs, generator), probs


def read_block_draft(proposer: object, draft: nn.Module, embed_tokens: nn.Module, lm_head: nn.Module) -> None:
    """The fields every block proposer (single or batched) reads from a DFlash / DSpark draft."""
    proposer.draft = draft
    proposer.embed_tokens = embed_tokens
    proposer.lm_head = lm_head
    proposer.is_dspark = hasattr(draft, "markov_head")
    proposer.block_size = int(draft.config.block_size)
    proposer.max_drafts = proposer.block_size if proposer.is_dspark else proposer.block_size - 1
    proposer.mask_token_id = int(draft.config.mask_token_id)
    proposer.device = next(draft.parameters()).device


class BlockProposer(Proposer):
    """DFlash and DSpark: one draft forward over `[anchor, MASK x (B-1)]` drafts a whole block.

    DFlash drafts B-1 tokens from slots 1..B-1 (slot 0 is the anchor); DSpark drafts B tokens, slot k
    predicting x_{a+k+1}, left to right with the Markov head's bias from the previous token. The draft's KV
    cache holds the context only (blocks are never cached), so nothing has to be cropped after a round.
    """

    def __init__(self, draft: nn.Module, embed_tokens: nn.Module, lm_head: nn.Module) -> None:
        read_block_draft(self, draft, embed_tokens, lm_head)
        # DSpark `--verify auto` (set by the Engine): stop drafting the block at the first slot it would not verify.
        self.scheduler: PrefixScheduler | None = None
        self.reset()

    def reset(self) -> None:
        self.cache = self.draft.new_cache()
        self.pending: list[torch.Tensor] = []

    def extend_context(self, features: torch.Tensor) -> None:
        self.pending.append(features)

    @torch.no_grad()
    def propose(self, tokens: list[int], sampling: SamplingParams, generator: torch.Generator, limit: int) -> Proposal:
        last_token = tokens[-1]
        context = torch.cat(self.pending, dim=1) if len(self.pending) > 1 else self.pending[0]
        self.pending = []
        start = self.cache.get_seq_length()
        anchor = start + context.shape[1]  # the anchor's position = the committed context length
        block = torch.full((1, self.block_size), self.mask_token_id, device=self.device)
        block[0, 0] = last_token
        positions = torch.arange(start, anchor + self.block_size, device=self.device)
        hidden = self.draft(
            inputs_embeds=self.embed_tokens(block),
            target_hidden=context,
            position_ids=positions,
            past_key_values=self.cache,
        )[0]
        if not self.is_dspark:
            tokens, probs = draw(self.lm_head(hidden[1 : 1 + limit]), sampling, generator)
            return Proposal(tokens, probs)
        return self._dspark_block(hidden[:limit], last_token, sampling, generator)

    def _dspark_block(
        self, hidden: torch.Tensor, last_token: int, sampling: SamplingParams, generator: torch.Generator
    ) -> Proposal:
        draft = self.draft
        base = self.lm_head(hidden)  # [n, V], computed once; the Markov bias depends on the previous token
        prev = torch.tensor([last_token], device=self.device)
        admission = self.scheduler.admission() if self.scheduler is not None else None
        tokens, probs = [], []
        for k in range(hidden.shape[0]):
            # The decision reads the draft only, so stopping here keeps decoding lossless.
            if admission is not None and not admission.admit(float(draft.confidence_logits(hidden[k : k + 1], prev))):
                break
            token, dist = draw(base[k : k + 1] + draft.markov_bias(prev), sampling, generator)
            tokens.append(token)
            if dist is not None:
                probs.append(dist)
            prev = token
        if not tokens:
            return Proposal.empty(self.device)
        return Proposal(torch.cat(tokens), torch.cat(probs) if probs else None)


def eagle3_target_logits(draft: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """EAGLE-3 logits over a pruned draft vocabulary [..., Vd] scattered onto target ids [..., V]."""
    if not draft.pruned_vocab:
        return logits
    full = logits.new_full((*logits.shape[:-1], int(draft.config.vocab_size)), float("-inf"))
    full[..., draft.draft_to_target(torch.arange(logits.shape[-1], device=logits.device))] = logits
    return full


class EagleProposer(Proposer):
    """EAGLE-1/2 and EAGLE-3 chains: one draft step per token, each fed the previous step's own hidden state.

    Alignment (SPEC §4): the draft's position t reads the target feature f_t and the token x_{t+1}, and predicts
    x_{t+2}. The committed context is fed once (teacher-forced with real target features); the chain's own
    positions are cropped from the draft cache when the next round's real features arrive.
    """

    def __init__(self, draft: nn.Module, lm_head: nn.Module | None = None, num_steps: int = 6) -> None:
        self.draft = draft
        self.is_eagle3 = hasattr(draft, "midlayer")
        if not self.is_eagle3 and lm_head is None:
            raise ValueError("an EAGLE-1 draft needs the target's lm_head")
        self.lm_head = lm_head
        self.max_drafts = num_steps
        self.per_token_drafting = True
        self.reset()

    def reset(self) -> None:
        self.cache = self.draft.new_cache()
        self.pending: list[torch.Tensor] = []
        self.context_length = 0  # draft positions fed with real target features

    def extend_context(self, features: torch.Tensor) -> None:
        if self.cache.get_seq_length() > self.context_length:
            self.cache.crop(self.context_length)  # drop the last round's speculative chain
        self.pending.append(features)

    def _step(self, token_ids: torch.Tensor, features: torch.Tensor, own: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden to feed the next step [1, L, H], logits over the TARGET vocabulary at the last position [V])."""
        if self.is_eagle3:
            kwargs = {"hidden_states": features} if own else {"target_hidden_states": features}
            out = self.draft(token_ids, past_key_values=self.cache, **kwargs)
            return out.hidden_states, self._target_vocab(out.logits[0, -1])
        predicted = self.draft(token_ids, hidden_states=features, past_key_values=self.cache)
        return predicted, self.lm_head(predicted[0, -1].to(self.lm_head.weight.dtype))

    def _target_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        return eagle3_target_logits(self.draft, logits)

    def _feed_context(self, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed the pending committed positions with their real target features; (hidden, logits) at the last."""
        features = torch.cat(self.pending, dim=1) if len(self.pending) > 1 else self.pending[0]
        self.pending = []
        start, count = self.context_length, features.shape[1]
        # Position t pairs feature f_t with token x_{t+1}.
        shifted = torch.tensor([tokens[start + 1 : start + count + 1]], device=features.device)
        hidden, logits = self._step(shifted, features, own=False)
        self.context_length = start + count
        return hidden, logits

    @torch.no_grad()
    def propose(self, tokens: list[int], sampling: SamplingParams, generator: torch.Generator, limit: int) -> Proposal:
        hidden, logits = self._feed_context(tokens)
        drafted, dists = [], []
        for step in range(min(limit, self.max_drafts)):
            token, dist = draw(logits.unsqueeze(0), sampling, generator)
            drafted.append(token)
            if dist is not None:
                dists.append(dist)
            if step + 1 == min(limit, self.max_drafts):
                break
            hidden, logits = self._step(token.view(1, 1), hidden[:, -1:], own=True)
        return Proposal(torch.cat(drafted), torch.cat(dists) if dists else None)


class EagleTreeProposer(EagleProposer):
    """EAGLE-2's dynamic draft tree, at any temperature (the target verifies it by walking down its own choices).

    From the context, expand the `top_k` most likely children of the best `top_k` nodes of each layer for `depth`
    layers, scoring nodes by cumulative log-probability, then keep the `total_tokens` best nodes (a score never
    rises along a path, so the kept set is closed under ancestors). One draft forward per layer, with a tree
    attention mask; the target verifies the whole tree in one forward.
    """

    def __init__(
        self,
        draft: nn.Module,
        lm_head: nn.Module | None = None,
        *,
        top_k: int = 4,
        depth: int = 5,
        total_tokens: int = 16,
    ) -> None:
        super().__init__(draft, lm_head, num_steps=depth)
        if min(top_k, depth, total_tokens) < 1:
            raise ValueError("tree top_k, depth and total_tokens must be at least 1")
        self.top_k, self.depth, self.total_tokens = top_k, depth, total_tokens
        self.tree_size, self.per_token_drafting = total_tokens, False

    @torch.no_grad()
    def propose(self, tokens: list[int], sampling: SamplingParams, generator: torch.Generator, limit: int) -> Proposal:
        hidden, logits = self._feed_context(tokens)
        device = hidden.device

        # Nodes: token, parent node (-1 = root), cumulative log-prob, depth, the hidden that predicted it.
        node_tokens: list[int] = []
        node_parent: list[int] = []
        node_score: list[float] = []
        node_cache: dict[int, int] = {}  # expanded node -> its draft cache position
        frontier = self._children(logits, 0.0, -1, node_tokens, node_parent, node_score)
        frontier_hidden = {i: hidden[:, -1:] for i in frontier}
        for level in range(2, min(self.depth, limit) + 1):
            expand = sorted(frontier, key=lambda i: -node_score[i])[: self.top_k]
            base = self.cache.get_seq_length()
            mask = torch.zeros(1, 1, len(expand), base + len(expand), dtype=torch.bool, device=device)
            mask[..., : self.context_length] = True
            for row, node in enumerate(expand):
                node_cache[node] = base + row
                ancestor = node_parent[node]
                while ancestor != -1:
                    mask[0, 0, row, node_cache[ancestor]] = True
                    ancestor = node_parent[ancestor]
                mask[0, 0, row, base + row] = True
            ids = torch.tensor([[node_tokens[i] for i in expand]], device=device)
            parent_hidden = torch.cat([frontier_hidden[i] for i in expand], dim=1)
            positions = torch.full((len(expand),), self.context_length + level - 2, device=device)
            out_hidden, out_logits = self._tree_step(ids, parent_hidden, positions, mask)
            frontier, frontier_hidden = [], {}
            for row, node in enumerate(expand):
                children = self._children(out_logits[row], node_score[node], node, node_tokens, node_parent, node_score)
                frontier += children
                frontier_hidden.update({c: out_hidden[:, row : row + 1] for c in children})
        keep = sorted(range(len(node_tokens)), key=lambda i: (-node_score[i], i))[: self.total_tokens]
        kept = set(keep)
        for i in list(keep):  # ties in score could leave a parent out: add it back
            while node_parent[i] != -1 and node_parent[i] not in kept:
                i = node_parent[i]
                kept.add(i)
        order = sorted(kept)  # parents are always created before their children
        index = {node: position for position, node in enumerate(order)}
        return Proposal(
            torch.tensor([node_tokens[i] for i in order], device=device),
            parents=[index[node_parent[i]] if node_parent[i] != -1 else -1 for i in order],
        )

    def _children(self, logits, score, parent, node_tokens, node_parent, node_score) -> list[int]:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(logprobs, min(self.top_k, logprobs.shape[-1]))
        created = []
        for value, token in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            node_tokens.append(token)
            node_parent.append(parent)
            node_score.append(score + value)
            created.append(len(node_tokens) - 1)
        return created

    def _tree_step(self, ids, hidden, positions, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft outputs for several tree nodes at once: (hidden [1, m, H], target-vocabulary logits [m, V])."""
        if self.is_eagle3:
            out = self.draft(
                ids, hidden_states=hidden, position_ids=positions, past_key_values=self.cache, attention_mask=mask
            )
            return out.hidden_states, self._target_vocab(out.logits[0])
        predicted = self.draft(
            ids, hidden_states=hidden, position_ids=positions, past_key_values=self.cache, attention_mask=mask
        )
        return predicted, self.lm_head(predicted[0].to(self.lm_head.weight.dtype))


def make_proposer(
    method: str,
    draft: nn.Module,
    target_model: nn.Module,
    *,
    num_steps: int = 6,
    tree: tuple[int, int, int] | None = None,
) -> Proposer:
    """The proposer of a loaded draft, wired to the target's embedding / lm_head where the method borrows them.

    `tree` = (top_k, depth, total_tokens) drafts an EAGLE-2 dynamic tree with an EAGLE-1 or EAGLE-3 draft.
    """
    if tree is not None and method not in ("eagle1", "eagle3"):
        raise ValueError("the EAGLE-2 dynamic tree needs an EAGLE-1 or EAGLE-3 draft")
    lm_head = target_model.get_output_embeddings()
    if method == "dflash":
        return BlockProposer(draft, target_model.get_input_embeddings(), lm_head)
    if method == "dspark":
        return BlockProposer(draft, draft.embed_tokens, draft.lm_head)
    if method == "eagle3":
        if not draft.owns_embeddings:
            draft.attach_target_embeddings(target_model.get_input_embeddings())
        lm_head = None
    if method in ("eagle1", "eagle3"):
        if tree is not None:
            top_k, depth, total = tree
            return EagleTreeProposer(draft, lm_head, top_k=top_k, depth=depth, total_tokens=total)
        return EagleProposer(draft, lm_head, num_steps=num_steps)
    raise ValueError(f"unknown method {method!r}")
