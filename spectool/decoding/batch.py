"""Batched speculative decoding: several prompts in one target forward per round, each row at its own length.

Each round every unfinished row drafts its own block or chain (batched draft forwards), the target
verifies all rows in ONE ragged forward (`FastTargetSession.forward_rows`: row b's tokens go after row b's own
cached prefix), and each row keeps its own accepted prefix under the same acceptance rules as the single-
sequence engine (greedy: the target's argmax; sampling: rejection sampling), so every row's output is what the
target alone produces for it. A row stops at eos, a stop string or `max_new_tokens`; finished rows leave the
batch (their cache rows are dropped), so the batch only ever computes for live rows.

Supported: the target alone, DFlash / DSpark blocks and EAGLE-1 / EAGLE-3 chains, on targets the lean forward
covers (Llama, Mistral, Qwen2, Qwen3). EAGLE-2 trees keep the single-sequence engine.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from spectool.decoding.accept import SamplingParams, accept_greedy, accept_sampling, probabilities
from spectool.decoding.engine import FinishReason, RoundEvent, choose_token, finish_reason
from spectool.decoding.fast_target import FastTargetSession, fast_path_problem
from spectool.decoding.proposers import draw, eagle3_target_logits, read_block_draft
from spectool.decoding.stops import StopStrings
from spectool.errors import UsageError
from spectool.target import FrozenTarget


class RaggedDraftCache:
    """A block draft's context keys/values for several rows of different lengths, preallocated.

    `update` (called by each draft layer) writes the new context of every row after that row's own length and
    returns the keys/values up to the longest row; `advance` then moves each row's length by its real (unpadded)
    count. Positions past a row's length hold padding and are masked out by the proposer.
    """

    def __init__(self, num_layers: int, rows: int) -> None:
        self.lengths = [0] * rows
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self._index: torch.Tensor | None = None

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, heads, width, dim = k.shape
        end = max(self.lengths) + width
        keys = self.keys[layer_idx]
        if keys is None or keys.shape[2] < end:
            capacity = max(64, end * 2)
            grown_k = k.new_zeros(rows, heads, capacity, dim)
            grown_v = v.new_zeros(rows, heads, capacity, dim)
            if keys is not None:
                grown_k[:, :, : keys.shape[2]] = keys
                grown_v[:, :, : keys.shape[2]] = self.values[layer_idx]
            self.keys[layer_idx], self.values[layer_idx] = grown_k, grown_v
        if layer_idx == 0 or self._index is None:
            starts = torch.tensor(self.lengths, device=k.device)
            positions = starts[:, None] + torch.arange(width, device=k.device)
            self._index = positions[:, None, :, None].expand(rows, heads, width, dim)
        self.keys[layer_idx].scatter_(2, self._index, k)
        self.values[layer_idx].scatter_(2, self._index, v)
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def advance(self, counts: Sequence[int]) -> None:
        self.lengths = [length + count for length, count in zip(self.lengths, counts, strict=True)]

    def keep_rows(self, rows: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self.keys[0].device) if self.keys[0] is not None else None
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if k is not None:
                self.keys[i], self.values[i] = k.index_select(0, index), v.index_select(0, index)
        self.lengths = [self.lengths[r] for r in rows]


class BatchedBlockProposer:
    """DFlash / DSpark drafting for several rows at once: one draft forward over every row's new context and
    block, each row at its own positions (see `BlockProposer` for the single-row rules it follows)."""

    def __init__(self, draft: nn.Module, embed_tokens: nn.Module, lm_head: nn.Module) -> None:
        read_block_draft(self, draft, embed_tokens, lm_head)

    def reset(self, rows: int) -> None:
        self.cache = RaggedDraftCache(len(self.draft.layers), rows)
        self.pending: list[list[torch.Tensor]] = [[] for _ in range(rows)]

    def extend_context(self, row: int, features: torch.Tensor) -> None:
        """Target features [n, K*H] of row `row`'s next n committed positions."""
        self.pending[row].append(features)

    def keep_rows(self, rows: list[int]) -> None:
        self.cache.keep_rows(rows)
        self.pending = [self.pending[r] for r in rows]

    @torch.no_grad()
    def propose(
        self, histories: list[list[int]], limits: list[int], sampling: SamplingParams, generator: torch.Generator
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per row (`histories[b]`: its prompt and answer so far): (draft tokens [<= limit], their distributions
        or None when greedy)."""
        rows = len(histories)
        last_tokens = [history[-1] for history in histories]
        contexts = [torch.cat(p, dim=0) if len(p) > 1 else p[0] for p in self.pending]
        self.pending = [[] for _ in range(rows)]
        counts = [c.shape[0] for c in contexts]
        width = max(counts)
        context = contexts[0].new_zeros(rows, width, contexts[0].shape[-1])
        for row, c in enumerate(contexts):
            context[row, : c.shape[0]] = c
        starts = torch.tensor(self.cache.lengths, device=self.device)
        anchors = starts + torch.tensor(counts, device=self.device)
        steps = torch.arange(max(width, self.block_size), device=self.device)
        positions = torch.cat((starts[:, None] + steps[:width], anchors[:, None] + steps[: self.block_size]), dim=1)
        block = torch.full((rows, self.block_size), self.mask_token_id, device=self.device)
        block[:, 0] = torch.tensor(last_tokens, device=self.device)
        cached = max(self.cache.lengths) + width
        visible = torch.arange(cached, device=self.device)[None, :] < anchors[:, None]  # [B, cached]
        mask = torch.cat((visible, visible.new_ones(rows, self.block_size)), dim=1)
        mask = mask[:, None, None, :].expand(rows, 1, self.block_size, cached + self.block_size)
        hidden = self.draft(
            inputs_embeds=self.embed_tokens(block),
            target_hidden=context,
            position_ids=positions,
            attention_mask=mask,
            past_key_values=self.cache,
        )
        self.cache.advance(counts)
        if not self.is_dspark:
            tokens, probs = draw(self.lm_head(hidden[:, 1:]), sampling, generator)
        else:
            base = self.lm_head(hidden)
            prev = block[:, 0]
            drawn, dists = [], []
            for k in range(self.block_size):
                prev, dist = draw(base[:, k] + self.draft.markov_bias(prev), sampling, generator)
                drawn.append(prev)
                dists += [dist] if dist is not None else []
            tokens = torch.stack(drawn, dim=1)
            probs = torch.stack(dists, dim=1) if dists else None
        return [
            (tokens[row, : limits[row]], None if probs is None else probs[row, : limits[row]]) for row in range(rows)
        ]


class BatchedEagleProposer:
    """EAGLE-1 / EAGLE-3 chains for several rows at once (see `EagleProposer` for the single-row rules): the new
    committed positions of every row are fed in one draft forward, then each chain step drafts one token per
    row. The draft cache is ragged; each row's chain positions are dropped when its next real features arrive."""

    def __init__(self, draft: nn.Module, lm_head: nn.Module | None, num_steps: int) -> None:
        self.draft = draft
        self.is_eagle3 = hasattr(draft, "midlayer")
        self.lm_head = lm_head
        self.max_drafts = num_steps
        self.device = next(draft.parameters()).device

    def reset(self, rows: int) -> None:
        self.cache = RaggedDraftCache(len(self.draft.layers) if not self.is_eagle3 else 1, rows)
        self.pending: list[list[torch.Tensor]] = [[] for _ in range(rows)]
        self.fed = [0] * rows  # draft positions per row fed with real target features

    def extend_context(self, row: int, features: torch.Tensor) -> None:
        self.pending[row].append(features)

    def keep_rows(self, rows: list[int]) -> None:
        self.cache.keep_rows(rows)
        self.pending = [self.pending[r] for r in rows]
        self.fed = [self.fed[r] for r in rows]

    def _step(self, ids: torch.Tensor, features: torch.Tensor, own: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """A draft forward over ids [B, W] at each row's next positions; (hidden [B, W, H], logits [B, W, V])."""
        rows, width = ids.shape
        starts = torch.tensor(self.cache.lengths, device=self.device)
        positions = starts[:, None] + torch.arange(width, device=self.device)
        keys = max(self.cache.lengths) + width
        mask = (torch.arange(keys, device=self.device) <= positions[:, :, None]).unsqueeze(1)  # [B, 1, W, keys]
        if self.is_eagle3:
            kwargs = {"hidden_states": features} if own else {"target_hidden_states": features}
            out = self.draft(ids, position_ids=positions, past_key_values=self.cache, attention_mask=mask, **kwargs)
            return out.hidden_states, eagle3_target_logits(self.draft, out.logits)
        hidden = self.draft(
            ids, hidden_states=features, position_ids=positions, past_key_values=self.cache, attention_mask=mask
        )
        return hidden, self.lm_head(hidden.to(self.lm_head.weight.dtype))

    @torch.no_grad()
    def propose(
        self, histories: list[list[int]], limits: list[int], sampling: SamplingParams, generator: torch.Generator
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        rows = len(histories)
        self.cache.lengths = list(self.fed)  # drop the last round's chains
        features = [torch.cat(p, dim=0) if len(p) > 1 else p[0] for p in self.pending]
        self.pending = [[] for _ in range(rows)]
        counts = [f.shape[0] for f in features]
        width = max(counts)
        context = features[0].new_zeros(rows, width, features[0].shape[-1])
        shifted = torch.zeros(rows, width, dtype=torch.long, device=self.device)
        for row, (f, history) in enumerate(zip(features, histories, strict=True)):
            context[row, : f.shape[0]] = f
            start = self.fed[row]  # position t pairs feature f_t with token x_{t+1}
            shifted[row, : f.shape[0]] = torch.tensor(history[start + 1 : start + f.shape[0] + 1], device=self.device)
        hidden, logits = self._step(shifted, context, own=False)
        self.cache.advance(counts)
        self.fed = [fed + count for fed, count in zip(self.fed, counts, strict=True)]
        last = torch.tensor(counts, device=self.device) - 1
        index = torch.arange(rows, device=self.device)
        hidden, logits = hidden[index, last].unsqueeze(1), logits[index, last]
        drafted, dists = [], []
        steps = min(max(limits), self.max_drafts)
        for step in range(steps):
            token, dist = draw(logits, sampling, generator)
            drafted.append(token)
            dists += [dist] if dist is not None else []
            if step + 1 == steps:
                break
            hidden, step_logits = self._step(token[:, None], hidden, own=True)
            self.cache.advance([1] * rows)
            logits = step_logits[:, 0]
        tokens = torch.stack(drafted, dim=1) if drafted else torch.empty(rows, 0, dtype=torch.long, device=self.device)
        probs = torch.stack(dists, dim=1) if dists else None
        return [
            (tokens[row, : limits[row]], None if probs is None else probs[row, : limits[row]]) for row in range(rows)
        ]


def make_batched_proposer(
    method: str, draft: nn.Module, target_model: nn.Module, *, num_steps: int = 6
) -> BatchedBlockProposer | BatchedEagleProposer:
    """The batched proposer of a draft, wired to the target's embedding / lm_head where the method borrows them
    (`num_steps`: EAGLE chain length)."""
    if method == "dflash":
        return BatchedBlockProposer(draft, target_model.get_input_embeddings(), target_model.get_output_embeddings())
    if method == "dspark":
        return BatchedBlockProposer(draft, draft.embed_tokens, draft.lm_head)
    if method == "eagle3":
        if not draft.owns_embeddings:
            draft.attach_target_embeddings(target_model.get_input_embeddings())
        return BatchedEagleProposer(draft, None, num_steps)
    if method == "eagle1":
        return BatchedEagleProposer(draft, target_model.get_output_embeddings(), num_steps)
    raise UsageError(f"no batched decoding for {method!r} drafts")


@dataclass
class BatchRow:
    """One prompt's answer from a batched generation."""

    tokens: list[int] = field(default_factory=list)
    rounds: list[RoundEvent] = field(default_factory=list)
    finish_reason: FinishReason | None = None


class BatchEngine:
    """Speculative (or target-alone, with no proposer) decoding of several prompts in lockstep rounds."""

    def __init__(
        self, target: FrozenTarget, proposer: BatchedBlockProposer | BatchedEagleProposer | None = None
    ) -> None:
        problem = fast_path_problem(target)
        if problem is not None:
            raise UsageError(f"batched decoding needs a Llama / Mistral / Qwen2 / Qwen3 target: {problem}")
        self.session = FastTargetSession(target)  # re-shaped per call to the batch's row count
        self.proposer = proposer
        self.device = next(target.model.parameters()).device

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 256,
        sampling: SamplingParams | None = None,
        stop_token_ids: Sequence[int] = (),
        stop_strings: StopStrings | None = None,
        seed: int | None = None,
        max_drafts: int | None = None,
    ) -> list[BatchRow]:
        """Answer every prompt; rows come back in prompt order. Per-row rounds carry the batch's timings."""
        sampling = sampling or SamplingParams()
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else 0)
        stops = set(stop_token_ids)
        results = [BatchRow() for _ in prompts]
        session = self.session
        session.reset(batch_size=len(prompts))
        proposer = self.proposer
        if proposer is not None:
            proposer.reset(len(prompts))

        start = time.perf_counter()
        lengths = [len(p) for p in prompts]
        padded = torch.zeros(len(prompts), max(lengths), dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            padded[row, : len(prompt)] = torch.tensor(list(prompt), device=self.device)
        logits, features = session.forward_rows(padded)
        session.lengths = list(lengths)
        live: list[int] = []  # prompt index of each batch row
        last: list[int] = []
        prefill_seconds = time.perf_counter() - start
        for row, length in enumerate(lengths):
            first = choose_token(logits[row, length - 1], sampling, generator)
            result = results[row]
            result.tokens.append(first)
            result.finish_reason = finish_reason(result.tokens, 1, stops, stop_strings, max_new_tokens)
            result.rounds.append(RoundEvent([first], 0, 0, "prefill", 0.0, prefill_seconds, result.finish_reason))
            if proposer is not None:
                proposer.extend_context(row, features[row, :length])
            live.append(row)
            last.append(first)
        self._drop_finished(session, live, last, results)

        while live:
            t0 = time.perf_counter()
            remaining = [max_new_tokens - len(results[i].tokens) for i in live]
            drafts: list[tuple[torch.Tensor, torch.Tensor | None]]
            if proposer is not None:
                cap = proposer.max_drafts if max_drafts is None else min(max_drafts, proposer.max_drafts)
                limits = [max(0, min(cap, r - 1)) for r in remaining]
                histories = [list(prompts[i]) + results[i].tokens for i in live]
                drafts = proposer.propose(histories, limits, sampling, generator)
            else:
                empty = torch.empty(0, dtype=torch.long, device=self.device)
                drafts = [(empty, None)] * len(live)
            t1 = time.perf_counter()
            width = 1 + max(d.shape[0] for d, _ in drafts)
            verify = torch.zeros(len(live), width, dtype=torch.long, device=self.device)
            for row, (tokens, _) in enumerate(drafts):
                verify[row, 0] = last[row]
                verify[row, 1 : 1 + tokens.shape[0]] = tokens
            starts = list(session.lengths)
            logits, features = session.forward_rows(verify)
            for row, (tokens, probs) in enumerate(drafts):
                k = tokens.shape[0]
                row_logits = logits[row, : k + 1]
                if sampling.greedy:
                    verdict = accept_greedy(tokens, row_logits)
                else:
                    verdict = accept_sampling(tokens, probs, probabilities(row_logits, sampling), generator)
                n = verdict.num_accepted
                session.lengths[row] = starts[row] + n + 1
                if proposer is not None:
                    proposer.extend_context(row, features[row, : n + 1])
                result = results[live[row]]
                produced = len(result.tokens)
                new = tokens[:n].tolist() + [verdict.next_token]
                result.tokens += new
                finish = None
                for i in range(len(new)):
                    finish = finish_reason(result.tokens, produced + i + 1, stops, stop_strings, max_new_tokens)
                    if finish:
                        del result.tokens[produced + i + 1 :]
                        new = new[: i + 1]
                        break
                kind = "bonus" if n == k else "correction"
                event = RoundEvent(new, k, min(n, len(new)), kind, t1 - t0, time.perf_counter() - t1, finish)
                result.rounds.append(event)
                result.finish_reason = finish
                last[row] = new[-1]
            self._drop_finished(session, live, last, results)
        return results

    def _drop_finished(
        self, session: FastTargetSession, live: list[int], last: list[int], results: list[BatchRow]
    ) -> None:
        """Remove finished rows from the batch (target cache, draft cache, bookkeeping), in place."""
        keep = [row for row, index in enumerate(live) if results[index].finish_reason is None]
        if len(keep) == len(live):
            return
        session.keep_rows(keep)
        if self.proposer is not None:
            self.proposer.keep_rows(keep)
        live[:] = [live[row] for row in keep]
        last[:] = [last[row] for row in keep]
