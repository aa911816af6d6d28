"""The speculative decoding loop that every command (chat, bench, demo) and the tests drive.

One round: the proposer drafts up to k tokens after the last committed token; the target runs ONE
forward over ``[last token | drafts]`` with its KV cache; the acceptance rule keeps a prefix of the drafts and
adds the target's own token (the correction at the first mismatch, or the bonus after a full accept); the
target's cache is cropped to the committed length and the features of the committed positions go to the
proposer as new context. The loop yields a `RoundEvent` per round; `commit_round` appends a round's tokens to the
answer and cuts it where it ends (stop token, stop string, `max_new_tokens`), for this engine and `BatchEngine`.

Acceptance length (tau) = tokens emitted per target verify forward, INCLUDING the target's own token, the
field's convention. The first token after the prompt comes from the prefill forward and counts as no round.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import DynamicCache

from spectool.decoding.accept import (
    SamplingParams,
    accept_greedy,
    accept_sampling,
    probabilities,
    sample,
    walk_tree,
)
from spectool.decoding.draft_length import DraftLengthController, PrefixScheduler
from spectool.decoding.fast_target import FastTargetSession
from spectool.decoding.proposers import Proposal, Proposer
from spectool.decoding.stops import StopStrings
from spectool.target import FrozenTarget, home_device

FinishReason = Literal["eos", "stop", "length"]


@dataclass
class RoundEvent:
    """One verify forward (or the prefill): what was drafted, kept, and added by the target."""

    tokens: list[int]  # emitted this round, in order: accepted drafts, then the target's token
    num_drafted: int
    num_accepted: int
    kind: Literal["prefill", "correction", "bonus"]  # how the target's own token came about
    draft_seconds: float
    verify_seconds: float
    finish_reason: FinishReason | None = None

    @property
    def target_token(self) -> int | None:
        """The token the target produced itself; None when a stop cut the round before it."""
        return self.tokens[self.num_accepted] if len(self.tokens) > self.num_accepted else None


@dataclass
class GenerationStats:
    """Summary of one generation, built from its rounds."""

    rounds: list[RoundEvent] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def new_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.rounds)

    @property
    def verify_rounds(self) -> list[RoundEvent]:
        return [r for r in self.rounds if r.kind != "prefill"]

    @property
    def acceptance_length(self) -> float:
        """Tokens per verify forward, the target's own token included (the field's tau)."""
        rounds = self.verify_rounds
        return sum(len(r.tokens) for r in rounds) / len(rounds) if rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def accepted_per_position(self) -> tuple[list[int], list[int]]:
        """(accepted, drafted) counts per draft position 0..k-1 over all rounds."""
        width = max((r.num_drafted for r in self.rounds), default=0)
        drafted, accepted = [0] * width, [0] * width
        for r in self.verify_rounds:
            for i in range(r.num_drafted):
                drafted[i] += 1
                accepted[i] += i < r.num_accepted
        return accepted, drafted


def cache_keyword(model: torch.nn.Module | type[torch.nn.Module]) -> str:
    """The name under which the model's (or model class's) forward takes its KV cache: `cache` from
    transformers 5.24 on, `past_key_values` before (given the new name, older releases pass it on unread and
    keep no cache)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class TargetSession:
    """The frozen target with a KV cache over the committed tokens, capturing the proposer's features, through
    the transformers forward (targets the lean forward of `fast_target` does not cover)."""

    def __init__(self, target: FrozenTarget) -> None:
        self.target = target
        self.model = target.model
        self.cache = DynamicCache()
        self.cache_keyword = cache_keyword(self.model)
        self.home = home_device(self.model)  # a target spread over devices returns its logits and features here

    def reset(self) -> None:
        self.cache = DynamicCache()

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    @torch.no_grad()
    def forward(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run `tokens` [1, n] after the cached prefix: (logits [n, V], features [1, n, K*H]).

        A boolean `attention_mask` [1, 1, n, cached + n] and `position_ids` [1, n] verify a tree."""
        store: dict = {}
        extra = {} if attention_mask is None else {"attention_mask": attention_mask, "position_ids": position_ids}
        with self.target.capture_hooks(store):
            extra[self.cache_keyword] = self.cache  # the cache grows in place
            out = self.model(input_ids=tokens, use_cache=True, **extra)
        return out.logits[0].to(self.home), self.target.features_from(store).to(self.home)

    def keep(self, base: int, rows: list[int]) -> None:
        """After a tree verify: keep the first `base` positions and then only the tree `rows` (the accepted path)."""
        rows_tensor = torch.tensor(rows) + base
        for layer in self.cache.layers:  # a spread target keeps each layer's cache on that layer's device
            index = rows_tensor.to(layer.keys.device)
            layer.keys = torch.cat((layer.keys[..., :base, :], layer.keys.index_select(-2, index)), dim=-2)
            layer.values = torch.cat((layer.values[..., :base, :], layer.values.index_select(-2, index)), dim=-2)

    def crop(self, length: int) -> None:
        """Keep the first `length` positions (transformers 5 crops by a negative count of positions to drop)."""
        drop = self.length - length
        if drop > 0:
            self.cache.crop(-drop)


def target_session(target: FrozenTarget) -> TargetSession | FastTargetSession:
    """The lean forward where the architecture allows it, else the transformers forward with a DynamicCache."""
    try:
        return FastTargetSession(target)
    except ValueError:  # `fast_path_problem` names what the lean forward does not cover
        return TargetSession(target)


class Engine:
    """Speculative decoding of one prompt at a time with a target and a proposer (None = target alone)."""

    def __init__(
        self,
        target: FrozenTarget,
        proposer: Proposer | None = None,
        scheduler: PrefixScheduler | None = None,
        controller: DraftLengthController | None = None,
    ) -> None:
        """`controller` (`--verify auto`): how many tokens to draft each round, 0 for a plain target step.
        `scheduler` (DSpark with a confidence head, with `--verify auto`): within that, the proposer drafts only
        the block's profitable prefix, stopping at the first slot the scheduler would not verify."""
        if scheduler is not None:
            if proposer is None:
                raise ValueError("a prefix scheduler needs a proposer that drafts block by block (DSpark)")
            proposer.use_scheduler(scheduler)  # refused by proposers that do not draft by blocks
        if controller is not None and proposer is None:
            raise ValueError("a draft-length controller needs a proposer")
        self.session = target_session(target)
        self.proposer = proposer
        self.scheduler = scheduler
        self.controller = controller
        self.device = home_device(target.model)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int = 256,
        sampling: SamplingParams | None = None,
        stop_token_ids: Sequence[int] = (),
        stop_strings: StopStrings | None = None,
        seed: int | None = None,
        max_drafts: int | None = None,
    ) -> Iterator[RoundEvent]:
        """Yield one RoundEvent per forward of the target until eos, a stop token, a stop string or
        `max_new_tokens`.

        `max_drafts` caps the tokens drafted per round (None = all the proposer offers). A stop token ends the
        answer with that token included (finish "eos"); a stop string ends it with the token that completes it
        (finish "stop"); either way the round's later tokens are dropped.
        """
        sampling = sampling or SamplingParams()
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else 0)
        ends = StopConditions(frozenset(stop_token_ids), stop_strings, max_new_tokens)
        session, proposer, controller = self.session, self.proposer, self.controller
        session.reset()
        if controller is not None:
            controller.new_answer()

        start = time.perf_counter()
        prompt = list(prompt_ids)
        logits, features = session.forward(torch.tensor([prompt], device=self.device))
        first = choose_token(logits[-1], sampling, generator)
        if proposer is not None:
            proposer.reset()
            proposer.use_scheduler(self.scheduler)  # DSpark drafts only the slots this engine's scheduler verifies
            proposer.extend_context(0, features[0])
        answer: list[int] = []
        event = commit_round(answer, [], first, 0, "prefill", ends, 0.0, time.perf_counter() - start)
        yield event
        while event.finish_reason is None:
            catch_up = proposer.pending_positions() if proposer is not None else 0
            t0 = time.perf_counter()
            proposal, drafting = self._propose(prompt, answer, max_drafts, ends, sampling, generator)
            t1 = time.perf_counter()
            if self.scheduler is not None and drafting:
                self.scheduler.observe_draft(t1 - t0)
            verify = self._verify_chain if proposal.parents is None else self._verify_tree
            accepted, target_token, num_drafted, full = verify(answer[-1], proposal, sampling, generator)
            verify_seconds = time.perf_counter() - t1
            if controller is not None:
                first = getattr(proposer, "first_seconds", None) if drafting else None
                controller.observe(
                    num_drafted,
                    len(accepted),
                    t1 - t0,
                    len(proposal.tokens),
                    ran=drafting,
                    catch_up=catch_up,
                    first_seconds=first,
                )
                controller.observe_verify(1 + len(proposal.tokens), verify_seconds)
            kind = "bonus" if full else "correction"
            event = commit_round(answer, accepted, target_token, num_drafted, kind, ends, t1 - t0, verify_seconds)
            yield event

    def _propose(
        self,
        prompt: list[int],
        answer: list[int],
        max_drafts: int | None,
        ends: StopConditions,
        sampling: SamplingParams,
        generator: torch.Generator,
    ) -> tuple[Proposal, bool]:
        """This round's drafts, and whether the proposer ran (the controller may choose a plain target step, and
        no draft fits when one token is left)."""
        proposer, remaining = self.proposer, ends.max_new_tokens - len(answer)
        if proposer is None or remaining <= 1:
            return Proposal.empty(self.device), False
        limit = remaining - 1 if max_drafts is None else min(max_drafts, remaining - 1)
        if self.controller is not None:
            limit = self.controller.choose(min(limit, proposer.max_drafts), proposer.tree_size)
        if limit <= 0:
            return Proposal.empty(self.device), False
        return proposer.propose([prompt + answer], [limit], sampling, generator)[0], True

    def _verify_chain(
        self, last: int, proposal: Proposal, sampling: SamplingParams, generator: torch.Generator
    ) -> tuple[list[int], int, int, bool]:
        """One forward over [last | drafts]; (accepted drafts, the target's token, drafted, all accepted)."""
        drafts = proposal.tokens
        verify_input = torch.cat((torch.tensor([last], device=self.device), drafts)).unsqueeze(0)
        logits, features = self.session.forward(verify_input)
        if sampling.greedy:
            verdict = accept_greedy(drafts, logits)
        else:
            verdict = accept_sampling(drafts, proposal.probs, probabilities(logits, sampling), generator)
        n = verdict.num_accepted
        # Keep the target's cache for `last` and the accepted drafts; the new token is not yet processed.
        self.session.crop(self.session.length - (len(drafts) - n))
        if self.proposer is not None:
            self.proposer.extend_context(0, features[0, : n + 1])
        return drafts[:n].tolist(), verdict.next_token, len(drafts), n == len(drafts)

    def _verify_tree(
        self, last: int, proposal: Proposal, sampling: SamplingParams, generator: torch.Generator
    ) -> tuple[list[int], int, int, bool]:
        """One forward over [last | tree nodes] with a tree attention mask; the target walks down the branch that
        holds its own choice at each node (`walk_tree`), greedy or sampled."""
        session, device = self.session, self.device
        nodes, parents = proposal.tokens.tolist(), proposal.parents
        base, n = session.length, len(nodes)
        rows_parent = [-1] + [p + 1 for p in parents]  # row 0 is `last`, node i is row i + 1
        visible, depth = tree_visibility(rows_parent)
        # built on the host and moved once: filling a device tensor element by element costs a transfer each
        tree = torch.tensor(visible, dtype=torch.bool)
        mask = torch.cat((tree.new_ones(n + 1, base), tree), dim=1).view(1, 1, n + 1, base + n + 1).to(device)
        tokens = torch.tensor([[last, *nodes]], device=device)
        positions = torch.tensor([[base + d for d in depth]], device=device)
        logits, features = session.forward(tokens, mask, positions)
        children: dict[int, list[int]] = {}
        for row in range(1, n + 1):
            children.setdefault(rows_parent[row], []).append(row)
        path, next_token = walk_tree(
            children, [last, *nodes], lambda row: choose_token(logits[row], sampling, generator)
        )
        session.keep(base, [0, *path])
        if self.proposer is not None:
            self.proposer.extend_context(0, features[0, [0, *path]])
        full = not children.get(path[-1] if path else 0)  # reached a leaf: the target's token is a bonus
        return [nodes[r - 1] for r in path], next_token, max(depth), full


def tree_visibility(parents: Sequence[int]) -> tuple[list[list[bool]], list[int]]:
    """Which rows of a tree each row attends to (itself and its ancestors) and each row's depth, for rows listed
    parents first (`parents[row]` < row; -1 for the root)."""
    visible: list[list[bool]] = []
    depth: list[int] = []
    for row, parent in enumerate(parents):
        if parent >= row:
            raise ValueError(f"tree row {row} comes before its parent {parent}")
        own = list(visible[parent]) if parent >= 0 else [False] * len(parents)
        own[row] = True
        visible.append(own)
        depth.append(depth[parent] + 1 if parent >= 0 else 0)
    return visible, depth


def choose_token(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator) -> int:
    """The target's token from its ``logits`` [V]: the argmax when greedy, else a draw from the warped
    distribution."""
    if sampling.greedy:
        return int(logits.argmax())
    return int(sample(probabilities(logits, sampling), generator))


@dataclass(frozen=True)
class StopConditions:
    """Where an answer ends: at a stop token (kept; finish "eos"), at the token whose text completes a stop string
    (kept; finish "stop"), or at `max_new_tokens` (finish "length")."""

    stop_token_ids: frozenset[int]
    stop_strings: StopStrings | None
    max_new_tokens: int

    def finish_reason(self, answer: list[int], end: int) -> FinishReason | None:
        """Why the answer ends at its token ``end - 1`` (``answer[:end]`` so far), if it does."""
        if answer[end - 1] in self.stop_token_ids:
            return "eos"
        if self.stop_strings is not None and self.stop_strings.completes_at(answer, end):
            return "stop"
        if end >= self.max_new_tokens:
            return "length"
        return None


def commit_round(
    answer: list[int],
    accepted: list[int],
    target_token: int,
    num_drafted: int,
    kind: Literal["prefill", "correction", "bonus"],
    ends: StopConditions,
    draft_seconds: float,
    verify_seconds: float,
) -> RoundEvent:
    """Commit one round to `answer` (in place), for `Engine` and `BatchEngine` alike: the `accepted` drafts, then
    the target's own token, cut after the first token that ends the answer (the round's later tokens are dropped).
    Returns the round's event."""
    new = [*accepted, target_token]
    produced = len(answer)
    answer += new
    finish = None
    for i in range(len(new)):
        finish = ends.finish_reason(answer, produced + i + 1)
        if finish:
            del answer[produced + i + 1 :]
            new = new[: i + 1]
            break
    num_accepted = min(len(accepted), len(new))
    return RoundEvent(new, num_drafted, num_accepted, kind, draft_seconds, verify_seconds, finish)
