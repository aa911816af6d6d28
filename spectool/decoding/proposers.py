"""Proposers: how each draft method turns the committed context into draft tokens, for one prompt or several.

A proposer drafts for the rows of a batch (one row per prompt; the single-prompt engine runs a batch of one) and
keeps its own state (draft KV cache, pending target features) in step with the engine through three calls:
`extend_context(row, features)` with the target features of a row's newly committed positions,
`propose(histories, limits, ...)` for the next round's drafts of every row, and `keep_rows(rows)` when finished
rows leave a batch. Draft tokens are greedy at temperature 0 and sampled from the draft's processed distribution
otherwise, whose probabilities go with them for rejection sampling.

One class per method: `DFlashProposer` and `DSparkProposer` draft a block per draft forward (`BlockProposer`),
`Eagle1Proposer` and `Eagle3Proposer` a chain of one-token steps (`EagleChainProposer`); `EagleTreeProposer`
(EAGLE-2) drafts a tree with either chain's draft, for one sequence. `make_proposer` builds the one a method names.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from spectool.decoding.accept import SamplingParams, probabilities, sample
from spectool.decoding.draft_cache import RaggedDraftCache
from spectool.decoding.vocab_head import DraftVocabHead
from spectool.errors import SpectoolError
from spectool.registry import get

if TYPE_CHECKING:
    from spectool.decoding.draft_length import PrefixScheduler, VerifyCostProfile


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
    """The draft side of the engines: drafts for each row of a batch (a single prompt is a batch of one)."""

    #: the most drafted tokens one round can accept: a chain's or block's length, a tree's depth (a tree drafts
    #: `tree_size` nodes a round, of which verification accepts one root-to-leaf path)
    max_drafts: int
    #: nodes of the tree a round drafts (EAGLE-2), None for a chain or a block
    tree_size: int | None = None
    #: whether drafting k tokens costs k draft forwards (a chain) rather than one (a block, a tree layer per level)
    per_token_drafting: bool = False

    @abstractmethod
    def reset(self, rows: int = 1) -> None:
        """Forget the previous generation; the next one decodes `rows` prompts together."""

    @abstractmethod
    def extend_context(self, row: int, features: torch.Tensor) -> None:
        """Target features [n, K*H] of row `row`'s next n committed positions, in order."""

    @abstractmethod
    def propose(
        self, histories: list[list[int]], limits: list[int], sampling: SamplingParams, generator: torch.Generator
    ) -> list[Proposal]:
        """Up to `limits[b]` draft tokens for each row b; `histories[b]` is its prompt and answer so far, whose
        last token (the one the drafts follow) has no target features yet."""

    def pending_positions(self) -> int:
        """Committed positions of the first row that the draft has not read yet (what the next round catches up)."""
        return 0

    def use_scheduler(self, scheduler: PrefixScheduler | None) -> None:
        """Draft only the block prefix `scheduler` admits (DSpark with a confidence head); others take none."""
        if scheduler is not None:
            raise ValueError("a prefix scheduler needs a proposer that drafts block by block (DSpark)")

    def prefix_scheduler(self, profile: VerifyCostProfile) -> PrefixScheduler | None:
        """The scheduler that cuts each block at its first unprofitable slot (`--verify auto`), for drafts that
        say how sure they are of each slot (DSpark's confidence head); None for the others."""
        return None

    def use_draft_vocab(self, ids: torch.Tensor) -> None:
        """Score only these target ids (`spectool.draft_vocab`) where the draft reads a full-vocabulary head."""
        raise SpectoolError(
            f"{type(self).__name__} does not read a full-vocabulary head; a draft vocabulary does not apply"
        )

    def as_tree(self, top_k: int, depth: int, total_tokens: int) -> Proposer:
        """The EAGLE-2 dynamic tree drafted with this proposer's draft (EAGLE chains only)."""
        raise ValueError("the EAGLE-2 dynamic tree needs an EAGLE-1 or EAGLE-3 draft")


def draw(
    logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Greedy argmax, or a sample with its processed distribution, for each row of `logits` [..., V]."""
    if sampling.greedy:
        return logits.argmax(-1), None
    probs = probabilities(logits, sampling)
    return sample(probs, generator), probs


def row_proposals(tokens: torch.Tensor, probs: torch.Tensor | None, counts: list[int]) -> list[Proposal]:
    """Row b's first `counts[b]` of the drafted `tokens` [B, k] (and distributions [B, k, V]) as its Proposal."""
    return [
        Proposal(tokens[row, :count], None if probs is None else probs[row, :count]) for row, count in enumerate(counts)
    ]


class RowProposer(Proposer):
    """What the block and chain proposers share: the draft, a ragged draft KV cache with one row per prompt, and
    each row's target features not yet fed to the draft."""

    def __init__(self, draft: nn.Module, max_drafts: int) -> None:
        self.draft = draft
        self.max_drafts = max_drafts
        self.device = next(draft.parameters()).device
        self.cache_layers = len(draft.new_cache().keys)
        self.reset()

    @classmethod
    @abstractmethod
    def for_target(cls, draft: nn.Module, target_model: nn.Module, *, num_steps: int) -> RowProposer:
        """This method's proposer of `draft`, wired to `target_model`'s embedding / lm_head where it borrows them
        (`num_steps`: tokens per round of a chain)."""

    def reset(self, rows: int = 1) -> None:
        self.cache = RaggedDraftCache(self.cache_layers, rows, self.device)
        self.pending: list[list[torch.Tensor]] = [[] for _ in range(rows)]

    def extend_context(self, row: int, features: torch.Tensor) -> None:
        self.pending[row].append(features)

    def pending_positions(self) -> int:
        return sum(f.shape[0] for f in self.pending[0]) if self.pending else 0

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows, in this order (finished rows leave a batched generation)."""
        self.cache.keep_rows(rows)
        self.pending = [self.pending[r] for r in rows]

    def take_pending(self) -> tuple[torch.Tensor, list[int]]:
        """Every row's pending features padded to the longest row ([B, W, K*H]), and each row's real count."""
        features = [torch.cat(p, dim=0) if len(p) > 1 else p[0] for p in self.pending]
        self.pending = [[] for _ in features]
        counts = [f.shape[0] for f in features]
        if len(features) == 1:
            return features[0].unsqueeze(0), counts
        padded = features[0].new_zeros(len(features), max(counts), features[0].shape[-1])
        for row, f in enumerate(features):
            padded[row, : f.shape[0]] = f
        return padded, counts


class BlockProposer(RowProposer):
    """DFlash and DSpark: one draft forward over every row's new context and `[anchor, MASK x (B-1)]` block drafts
    a whole block per row, each row at its own positions.

    The draft's KV cache holds the context only (blocks are never cached), so nothing has to be cropped after a
    round. How a block's hidden states become tokens is the method's own (`draw_block`).
    """

    def __init__(self, draft: nn.Module, embed_tokens: nn.Module, lm_head: nn.Module, max_drafts: int) -> None:
        self.embed_tokens, self.lm_head = embed_tokens, lm_head
        self.vocab_head: DraftVocabHead | None = None
        self.block_size = int(draft.config.block_size)
        self.mask_token_id = int(draft.config.mask_token_id)
        super().__init__(draft, max_drafts)

    @abstractmethod
    def draw_block(
        self,
        hidden: torch.Tensor,
        anchors: torch.Tensor,
        limits: list[int],
        sampling: SamplingParams,
        generator: torch.Generator,
    ) -> list[Proposal]:
        """Each row's drafts from the block's hidden states [B, block, H] after its anchor token [B]."""

    @torch.no_grad()
    def propose(
        self, histories: list[list[int]], limits: list[int], sampling: SamplingParams, generator: torch.Generator
    ) -> list[Proposal]:
        rows = len(histories)
        context, counts = self.take_pending()
        positions, mask = self._positions_and_mask(counts, context.shape[1])
        anchors = torch.tensor([history[-1] for history in histories], device=self.device)
        block = torch.full((rows, self.block_size), self.mask_token_id, device=self.device)
        block[:, 0] = anchors
        hidden = self.draft(
            inputs_embeds=self.embed_tokens(block),
            target_hidden=context,
            position_ids=positions,
            attention_mask=mask,
            past_key_values=self.cache,
        )
        self.cache.advance(counts)
        return self.draw_block(hidden, anchors, limits, sampling, generator)

    def _positions_and_mask(self, counts: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions [B, width + block] of each row's new context then its block (the anchor's position = the row's
        committed length), and the mask that hides other rows' padding (None for one row: it has none)."""
        starts = self.cache.lengths
        if len(starts) == 1:
            return torch.arange(starts[0], starts[0] + width + self.block_size, device=self.device)[None], None
        rows, size = len(starts), self.block_size
        anchors = torch.tensor([s + c for s, c in zip(starts, counts, strict=True)], device=self.device)
        steps = torch.arange(max(width, size), device=self.device)
        starts_t = torch.tensor(starts, device=self.device)
        positions = torch.cat((starts_t[:, None] + steps[:width], anchors[:, None] + steps[:size]), dim=1)
        cached = max(starts) + width
        visible = torch.arange(cached, device=self.device)[None, :] < anchors[:, None]  # [B, cached]
        mask = torch.cat((visible, visible.new_ones(rows, size)), dim=1)
        return positions, mask[:, None, None, :].expand(rows, 1, size, cached + size)


class DFlashProposer(BlockProposer):
    """DFlash: slot 0 of the block is the anchor; slots 1..B-1 draft B-1 tokens in parallel from the target's
    embedding and lm_head."""

    def __init__(self, draft: nn.Module, embed_tokens: nn.Module, lm_head: nn.Module) -> None:
        super().__init__(draft, embed_tokens, lm_head, max_drafts=int(draft.config.block_size) - 1)

    @classmethod
    def for_target(cls, draft: nn.Module, target_model: nn.Module, *, num_steps: int) -> DFlashProposer:
        """Wired to the target's embedding and lm_head (`num_steps` is a chain's; a block drafts B-1)."""
        return cls(draft, target_model.get_input_embeddings(), target_model.get_output_embeddings())

    def use_draft_vocab(self, ids: torch.Tensor) -> None:
        head = self.lm_head.weight
        self.vocab_head = DraftVocabHead(ids.to(self.device), head.shape[0], lm_head=head.to(self.device))

    def draw_block(self, hidden, anchors, limits, sampling, generator) -> list[Proposal]:
        width = min(max(limits), self.max_drafts)
        slots = hidden[:, 1 : 1 + width]
        if self.vocab_head is not None:
            tokens, probs = self.vocab_head.draw(self.vocab_head.lm_head(slots), sampling, generator)
        else:
            logits = self.lm_head(slots).to(self.device)  # the target's lm_head may sit on another GPU
            tokens, probs = draw(logits, sampling, generator)
        return row_proposals(tokens, probs, limits)


class DSparkProposer(BlockProposer):
    """DSpark: B tokens per block, slot k predicting x_{a+k+1}, drawn left to right with the Markov head's bias from
    the previous token. With a prefix scheduler (`--verify auto`, a confidence head) each row stops drafting at the
    first slot the scheduler would not verify; the decision reads the draft only, so decoding stays lossless."""

    def __init__(self, draft: nn.Module, embed_tokens: nn.Module, lm_head: nn.Module) -> None:
        super().__init__(draft, embed_tokens, lm_head, max_drafts=int(draft.config.block_size))
        self.scheduler: PrefixScheduler | None = None

    @classmethod
    def for_target(cls, draft: nn.Module, target_model: nn.Module, *, num_steps: int) -> DSparkProposer:
        """Wired to the draft's own embedding and lm_head (copies of the target's; `num_steps` is a chain's)."""
        return cls(draft, draft.embed_tokens, draft.lm_head)

    def use_scheduler(self, scheduler: PrefixScheduler | None) -> None:
        self.scheduler = scheduler

    def prefix_scheduler(self, profile: VerifyCostProfile) -> PrefixScheduler | None:
        config = self.draft.config
        if not config.enable_confidence_head:
            return None
        from spectool.decoding.draft_length import PrefixScheduler

        return PrefixScheduler(profile, getattr(config, "confidence_temperatures", None))

    def use_draft_vocab(self, ids: torch.Tensor) -> None:
        markov = self.draft.markov_head.markov_w2.weight
        self.vocab_head = DraftVocabHead(ids, markov.shape[0], lm_head=self.lm_head.weight, markov_w2=markov)

    def draw_block(self, hidden, anchors, limits, sampling, generator) -> list[Proposal]:
        width = min(max(limits), self.max_drafts)
        vocab = self.vocab_head
        head = self.lm_head if vocab is None else vocab.lm_head
        base = head(hidden[:, :width])  # [B, n, V], once; the Markov bias depends on the previous token
        admissions = None if self.scheduler is None else [self.scheduler.admission() for _ in limits]
        counts = list(limits)  # drafted per row: a row stops at its limit or at its first unadmitted slot
        prev, drawn, dists = anchors, [], []
        for k in range(width):
            if admissions is not None:
                confidence = self.draft.confidence_logits(hidden[:, k], prev).tolist()
                for row, admission in enumerate(admissions):
                    if counts[row] > k and not admission.admit(confidence[row]):
                        counts[row] = k
                if max(counts) <= k:
                    break
            if vocab is None:
                prev, dist = draw(base[:, k] + self.draft.markov_bias(prev), sampling, generator)
            else:
                bias = vocab.markov_w2(self.draft.markov_head.markov_w1(prev))
                prev, dist = vocab.draw(base[:, k] + bias, sampling, generator)
            drawn.append(prev)
            dists += [dist] if dist is not None else []
        if not drawn:
            return [Proposal.empty(self.device) for _ in limits]
        return row_proposals(torch.stack(drawn, dim=1), torch.stack(dists, dim=1) if dists else None, counts)


class EagleChainProposer(RowProposer):
    """EAGLE-1 and EAGLE-3 chains: one draft step per token, each fed the previous step's own hidden state.

    Alignment: the draft's position t reads the target feature f_t and the token x_{t+1}, and predicts
    x_{t+2}. Each row's committed context is fed once (teacher-forced with real target features); the chain's own
    positions are dropped from the draft cache when the next round's real features arrive. How one step runs the
    draft (`draft_step`) and reaches the target vocabulary (`target_logits`) is the method's own.
    """

    per_token_drafting = True
    first_seconds: float | None = None  # the last round's feed and first token (what its first token cost)

    def reset(self, rows: int = 1) -> None:
        super().reset(rows)
        self.fed = [0] * rows  # draft positions per row fed with real target features

    def keep_rows(self, rows: list[int]) -> None:
        super().keep_rows(rows)
        self.fed = [self.fed[r] for r in rows]

    @abstractmethod
    def draft_step(
        self, ids: torch.Tensor, features: torch.Tensor, own: bool, positions: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A draft forward over `ids` [B, W] at `positions` [B, W] with `features` (the target's when not `own`,
        else the draft's previous hidden states): (hidden to feed the next step [B, W, H], the input of
        `target_logits` at each position)."""

    @abstractmethod
    def target_logits(self, head_input: torch.Tensor) -> torch.Tensor:
        """Logits over the TARGET vocabulary [..., V] from `draft_step`'s second output at chosen positions."""

    def as_tree(self, top_k: int, depth: int, total_tokens: int) -> EagleTreeProposer:
        return EagleTreeProposer(self, top_k=top_k, depth=depth, total_tokens=total_tokens)

    def feed(self, histories: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed every row's pending committed positions with their real target features, after dropping the last
        round's chain: (hidden [B, 1, H], target-vocabulary logits [B, V]) at each row's last position."""
        self.cache.lengths = list(self.fed)
        context, counts = self.take_pending()
        width = context.shape[1]
        # Position t pairs feature f_t with token x_{t+1}; rows shorter than `width` are padded with token 0.
        rows = zip(histories, self.fed, counts, strict=True)
        shifted = [history[fed + 1 : fed + count + 1] for history, fed, count in rows]
        ids = torch.tensor([s + [0] * (width - len(s)) for s in shifted], device=self.device)
        positions = self.cache.positions(width)
        hidden, head = self.draft_step(ids, context, False, positions, self.cache.causal_mask(positions))
        self.cache.advance(counts)
        self.fed = [fed + count for fed, count in zip(self.fed, counts, strict=True)]
        if len(counts) == 1:
            return hidden[:, -1:], self.target_logits(head[:, -1])
        rows, last = torch.arange(len(counts), device=self.device), torch.tensor(counts, device=self.device) - 1
        return hidden[rows, last].unsqueeze(1), self.target_logits(head[rows, last])

    @torch.no_grad()
    def propose(
        self, histories: list[list[int]], limits: list[int], sampling: SamplingParams, generator: torch.Generator
    ) -> list[Proposal]:
        began, self.first_seconds = time.perf_counter(), None
        hidden, logits = self.feed(histories)
        steps = min(max(limits), self.max_drafts)
        drafted, dists = [], []
        for step in range(steps):
            token, dist = draw(logits, sampling, generator)
            drafted.append(token)
            dists += [dist] if dist is not None else []
            if step == 0:  # the feed over the committed positions and the first token: `--verify auto` costs it apart
                self.first_seconds = time.perf_counter() - began
            if step + 1 == steps:
                break
            positions = self.cache.positions(1)
            hidden, head = self.draft_step(token[:, None], hidden, True, positions, self.cache.causal_mask(positions))
            self.cache.advance([1] * len(limits))
            logits = self.target_logits(head[:, 0])
        if not drafted:
            return [Proposal.empty(self.device) for _ in limits]
        return row_proposals(torch.stack(drafted, dim=1), torch.stack(dists, dim=1) if dists else None, limits)


class Eagle1Proposer(EagleChainProposer):
    """EAGLE-1 (and EAGLE-2's chain): the draft predicts the next target feature; the target's lm_head reads it."""

    def __init__(self, draft: nn.Module, lm_head: nn.Module, num_steps: int) -> None:
        self.lm_head = lm_head
        self.vocab_head: DraftVocabHead | None = None
        super().__init__(draft, num_steps)

    @classmethod
    def for_target(cls, draft: nn.Module, target_model: nn.Module, *, num_steps: int) -> Eagle1Proposer:
        """Wired to the target's lm_head; `num_steps` tokens per chain."""
        return cls(draft, target_model.get_output_embeddings(), num_steps)

    def draft_step(self, ids, features, own, positions, mask) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.draft(
            ids, hidden_states=features, position_ids=positions, past_key_values=self.cache, attention_mask=mask
        )
        return hidden, hidden

    def use_draft_vocab(self, ids: torch.Tensor) -> None:
        head = self.lm_head.weight
        self.vocab_head = DraftVocabHead(ids.to(self.device), head.shape[0], lm_head=head.to(self.device))

    def target_logits(self, head_input: torch.Tensor) -> torch.Tensor:
        if self.vocab_head is not None:  # the kept rows only, the rest -inf (chains and EAGLE-2 trees alike)
            head = self.vocab_head.lm_head
            return self.vocab_head.scatter(head(head_input.to(head.weight.dtype)))
        return self.lm_head(head_input.to(self.lm_head.weight.dtype)).to(head_input.device)  # a spread target's head


class Eagle3Proposer(EagleChainProposer):
    """EAGLE-3: the draft fuses several target layers and has its own lm_head, possibly over a pruned vocabulary
    (its logits are then scattered back onto target ids)."""

    @classmethod
    def for_target(cls, draft: nn.Module, target_model: nn.Module, *, num_steps: int) -> Eagle3Proposer:
        """Gives a draft without embeddings of its own the target's; `num_steps` tokens per chain."""
        if not draft.owns_embeddings:
            draft.attach_target_embeddings(target_model.get_input_embeddings())
        return cls(draft, num_steps)

    def draft_step(self, ids, features, own, positions, mask) -> tuple[torch.Tensor, torch.Tensor]:
        given = {"hidden_states": features} if own else {"target_hidden_states": features}
        out = self.draft(ids, position_ids=positions, past_key_values=self.cache, attention_mask=mask, **given)
        return out.hidden_states, out.logits

    def target_logits(self, head_input: torch.Tensor) -> torch.Tensor:
        if not self.draft.pruned_vocab:
            return head_input
        full = head_input.new_full((*head_input.shape[:-1], int(self.draft.config.vocab_size)), float("-inf"))
        index = getattr(self, "_target_ids", None)  # the draft's vocabulary as target ids, looked up once
        if index is None or index.device != head_input.device:
            index = self._target_ids = self.draft.draft_to_target(
                torch.arange(head_input.shape[-1], device=full.device)
            )
        full[..., index] = head_input
        return full


class EagleTreeProposer(Proposer):
    """EAGLE-2's dynamic draft tree for one sequence, drafted with an EAGLE-1 or EAGLE-3 chain's draft, at any
    temperature (the target verifies it by walking down its own choices).

    From the context, expand the `top_k` most likely children of the best `top_k` nodes of each layer for `depth`
    layers, scoring nodes by cumulative log-probability, then keep the `total_tokens` best nodes (a score never
    rises along a path, so the kept set is closed under ancestors). One draft forward per layer, with a tree
    attention mask; the target verifies the whole tree in one forward.
    """

    def __init__(self, chain: EagleChainProposer, *, top_k: int = 4, depth: int = 5, total_tokens: int = 16) -> None:
        if min(top_k, depth, total_tokens) < 1:
            raise ValueError("tree top_k, depth and total_tokens must be at least 1")
        self.chain, self.draft = chain, chain.draft
        self.top_k, self.depth, self.total_tokens = top_k, depth, total_tokens
        self.max_drafts, self.tree_size = depth, total_tokens

    def reset(self, rows: int = 1) -> None:
        if rows != 1:
            raise ValueError("an EAGLE-2 tree drafts for one sequence at a time")
        self.chain.reset()

    def extend_context(self, row: int, features: torch.Tensor) -> None:
        self.chain.extend_context(row, features)

    def pending_positions(self) -> int:
        return self.chain.pending_positions()

    @torch.no_grad()
    def propose(
        self, histories: list[list[int]], limits: list[int], sampling: SamplingParams, generator: torch.Generator
    ) -> list[Proposal]:
        chain = self.chain
        hidden, logits = chain.feed(histories)
        context_length, device = chain.fed[0], hidden.device
        tree = _DraftTree(self.top_k)
        frontier = tree.add_children(logits[0], -1)
        frontier_hidden = {i: hidden for i in frontier}
        node_cache: dict[int, int] = {}  # expanded node -> its draft cache position
        for level in range(2, min(self.depth, limits[0]) + 1):
            expand = sorted(frontier, key=lambda i: -tree.scores[i])[: self.top_k]
            base = chain.cache.lengths[0]
            # The mask is built on the host and moved once (filling a device tensor element by element costs a
            # transfer per element on a GPU).
            visible = [[True] * context_length + [False] * (base + len(expand) - context_length) for _ in expand]
            for row, node in enumerate(expand):
                node_cache[node] = base + row
                ancestor = tree.parents[node]
                while ancestor != -1:
                    visible[row][node_cache[ancestor]] = True
                    ancestor = tree.parents[ancestor]
                visible[row][base + row] = True
            mask = torch.tensor(visible, dtype=torch.bool).view(1, 1, len(expand), -1).to(device)
            ids = torch.tensor([[tree.tokens[i] for i in expand]], device=device)
            parent_hidden = torch.cat([frontier_hidden[i] for i in expand], dim=1)
            positions = torch.full((1, len(expand)), context_length + level - 2, device=device)
            out_hidden, head = chain.draft_step(ids, parent_hidden, True, positions, mask)
            chain.cache.advance([len(expand)])
            out_logits = chain.target_logits(head[0])
            frontier, frontier_hidden = [], {}
            for row, node in enumerate(expand):
                children = tree.add_children(out_logits[row], node)
                frontier += children
                frontier_hidden.update({c: out_hidden[:, row : row + 1] for c in children})
        return [tree.best(self.total_tokens, device)]


class _DraftTree:
    """The nodes of one drafted tree: token, parent node (-1 = the root, the last committed token) and cumulative
    log-probability of each."""

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.scores: list[float] = []

    def add_children(self, logits: torch.Tensor, parent: int) -> list[int]:
        """Add the `top_k` most likely tokens under `logits` [V] as children of `parent`; their node indices."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(logprobs, min(self.top_k, logprobs.shape[-1]))
        score = self.scores[parent] if parent != -1 else 0.0
        created = []
        for value, token in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            self.tokens.append(token)
            self.parents.append(parent)
            self.scores.append(score + value)
            created.append(len(self.tokens) - 1)
        return created

    def best(self, total_tokens: int, device: torch.device) -> Proposal:
        """The `total_tokens` best nodes (with any parent a tie in score left out), parents before children."""
        keep = sorted(range(len(self.tokens)), key=lambda i: (-self.scores[i], i))[:total_tokens]
        kept = set(keep)
        for i in list(keep):
            while self.parents[i] != -1 and self.parents[i] not in kept:
                i = self.parents[i]
                kept.add(i)
        order = sorted(kept)  # parents are always created before their children
        index = {node: position for position, node in enumerate(order)}
        return Proposal(
            torch.tensor([self.tokens[i] for i in order], device=device),
            parents=[index[self.parents[i]] if self.parents[i] != -1 else -1 for i in order],
        )


def make_proposer(
    method: str,
    draft: nn.Module,
    target_model: nn.Module,
    *,
    num_steps: int = 6,
    tree: tuple[int, int, int] | None = None,
    vocab: torch.Tensor | None = None,
) -> Proposer:
    """The proposer of a loaded draft, wired to the target's embedding / lm_head where the method borrows them
    (`num_steps`: EAGLE chain length). It drafts for one prompt (`Engine`) or several (`BatchEngine`).

    `tree` = (top_k, depth, total_tokens) drafts an EAGLE-2 dynamic tree with an EAGLE-1 or EAGLE-3 draft.
    `vocab`: the draft's decode-time vocabulary (`spectool.draft_vocab`), for drafts that read a full-vocabulary head.
    """
    proposer = get(method).proposer_class().for_target(draft, target_model, num_steps=num_steps)
    if vocab is not None:
        proposer.use_draft_vocab(vocab)
    return proposer if tree is None else proposer.as_tree(*tree)
