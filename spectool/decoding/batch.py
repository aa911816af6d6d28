"""Batched speculative decoding: several prompts in one target forward per round, each row at its own length.

Each round every unfinished row drafts its own block or chain (batched draft forwards), the target
verifies all rows in ONE ragged forward (`FastTargetSession.forward_rows`: row b's tokens go after row b's own
cached prefix), and each row keeps its own accepted prefix under the same acceptance rules as the single-
sequence engine (greedy: the target's argmax; sampling: rejection sampling), so every row's output is what the
target alone produces for it. A row stops at eos, a stop string or `max_new_tokens`; finished rows leave the
batch (their cache rows are dropped), so the batch only ever computes for live rows.

Supported: the target alone, DFlash / DSpark blocks and EAGLE-1 / EAGLE-3 chains (the same proposers the single-
prompt engine runs as a batch of one, and the same `commit_round`), on targets the lean forward covers (Llama,
Mistral, Qwen2, Qwen3). EAGLE-2 trees keep the single-sequence engine.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from spectool.decoding.accept import SamplingParams, accept_greedy, accept_sampling, probabilities
from spectool.decoding.engine import FinishReason, RoundEvent, StopConditions, choose_token, commit_round
from spectool.decoding.fast_target import FastTargetSession, fast_path_problem
from spectool.decoding.proposers import Proposal, RowProposer
from spectool.decoding.stops import StopStrings
from spectool.errors import UsageError
from spectool.target import FrozenTarget, home_device


@dataclass
class BatchRow:
    """One prompt's answer from a batched generation."""

    tokens: list[int] = field(default_factory=list)
    rounds: list[RoundEvent] = field(default_factory=list)
    finish_reason: FinishReason | None = None


class BatchEngine:
    """Speculative (or target-alone, with no proposer) decoding of several prompts in lockstep rounds."""

    def __init__(self, target: FrozenTarget, proposer: RowProposer | None = None) -> None:
        problem = fast_path_problem(target)
        if problem is not None:
            raise UsageError(f"batched decoding needs a Llama / Mistral / Qwen2 / Qwen3 target: {problem}")
        if proposer is not None and not isinstance(proposer, RowProposer):
            raise UsageError("batched decoding drafts blocks or chains; an EAGLE-2 tree decodes one prompt at a time")
        self.session = FastTargetSession(target)  # re-shaped per call to the batch's row count
        self.proposer = proposer
        self.device = home_device(target.model)

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
        ends = StopConditions(frozenset(stop_token_ids), stop_strings, max_new_tokens)
        results = [BatchRow() for _ in prompts]
        prompt_lists = [list(p) for p in prompts]
        live = self._prefill(prompt_lists, results, ends, sampling, generator)  # prompt index of each batch row
        while live:
            t0 = time.perf_counter()
            drafts = self._propose(prompt_lists, results, live, max_drafts, ends, sampling, generator)
            t1 = time.perf_counter()
            width = 1 + max(d.tokens.shape[0] for d in drafts)
            verify = torch.zeros(len(live), width, dtype=torch.long, device=self.device)
            for row, proposal in enumerate(drafts):
                verify[row, 0] = results[live[row]].tokens[-1]
                verify[row, 1 : 1 + proposal.tokens.shape[0]] = proposal.tokens
            session = self.session
            starts = list(session.lengths)
            logits, features = session.forward_rows(verify)
            for row, proposal in enumerate(drafts):
                k = proposal.tokens.shape[0]
                row_logits = logits[row, : k + 1]
                if sampling.greedy:
                    verdict = accept_greedy(proposal.tokens, row_logits)
                else:
                    verdict = accept_sampling(
                        proposal.tokens, proposal.probs, probabilities(row_logits, sampling), generator
                    )
                n = verdict.num_accepted
                session.lengths[row] = starts[row] + n + 1
                if self.proposer is not None:
                    self.proposer.extend_context(row, features[row, : n + 1])
                result = results[live[row]]
                kind = "bonus" if n == k else "correction"
                accepted = proposal.tokens[:n].tolist()
                verify_seconds = time.perf_counter() - t1
                event = commit_round(
                    result.tokens, accepted, verdict.next_token, k, kind, ends, t1 - t0, verify_seconds
                )
                result.rounds.append(event)
                result.finish_reason = event.finish_reason
            self._drop_finished(live, results)
        return results

    def _prefill(
        self,
        prompts: list[list[int]],
        results: list[BatchRow],
        ends: StopConditions,
        sampling: SamplingParams,
        generator: torch.Generator,
    ) -> list[int]:
        """One forward over every prompt (padded), each row's first token committed; the rows still live."""
        session, proposer = self.session, self.proposer
        session.reset(batch_size=len(prompts))
        if proposer is not None:
            proposer.reset(len(prompts))
            proposer.use_scheduler(None)  # every row drafts the whole block
        start = time.perf_counter()
        lengths = [len(p) for p in prompts]
        padded = torch.zeros(len(prompts), max(lengths), dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            padded[row, : len(prompt)] = torch.tensor(prompt, device=self.device)
        logits, features = session.forward_rows(padded)
        session.lengths = list(lengths)
        prefill_seconds = time.perf_counter() - start
        for row, length in enumerate(lengths):
            first = choose_token(logits[row, length - 1], sampling, generator)
            result = results[row]
            result.rounds.append(commit_round(result.tokens, [], first, 0, "prefill", ends, 0.0, prefill_seconds))
            result.finish_reason = result.rounds[-1].finish_reason
            if proposer is not None:
                proposer.extend_context(row, features[row, :length])
        live = list(range(len(prompts)))
        self._drop_finished(live, results)
        return live

    def _propose(
        self,
        prompts: list[list[int]],
        results: list[BatchRow],
        live: list[int],
        max_drafts: int | None,
        ends: StopConditions,
        sampling: SamplingParams,
        generator: torch.Generator,
    ) -> list[Proposal]:
        """Every live row's drafts this round (none without a proposer; none past a row's last token)."""
        proposer = self.proposer
        if proposer is None:
            return [Proposal.empty(self.device)] * len(live)
        cap = proposer.max_drafts if max_drafts is None else min(max_drafts, proposer.max_drafts)
        limits = [max(0, min(cap, ends.max_new_tokens - len(results[i].tokens) - 1)) for i in live]
        histories = [prompts[i] + results[i].tokens for i in live]
        return proposer.propose(histories, limits, sampling, generator)

    def _drop_finished(self, live: list[int], results: list[BatchRow]) -> None:
        """Remove finished rows from the batch (target cache, draft cache, bookkeeping), in place."""
        keep = [row for row, index in enumerate(live) if results[index].finish_reason is None]
        if len(keep) == len(live):
            return
        self.session.keep_rows(keep)
        if self.proposer is not None:
            self.proposer.keep_rows(keep)
        live[:] = [live[row] for row in keep]
