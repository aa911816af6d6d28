"""Honest benchmarks: the speculative engine against the target alone (same loop), HF `generate` and HF
prompt-lookup decoding, interleaved prompt by prompt in one run, with losslessness checks: at temperature 0 the
speculative output must equal, token for token, the target's greedy output through spectool's loop and, when the
HF baseline runs, through HF `generate` (an implementation spectool does not share).

Speedups are ratios of tokens per second measured side by side in the same process on the same prompts.
"""

from __future__ import annotations

import os
import platform
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from spectool.baselines import timed_hf, timed_hf_batch, timed_zlab, zlab_draft
from spectool.bench_prompts import BenchPrompt
from spectool.decoding.accept import SamplingParams
from spectool.decoding.engine import Engine, GenerationStats
from spectool.decoding.limits import memory_bandwidth, step_weight_bytes
from spectool.decoding.stops import StopStrings
from spectool.errors import UsageError
from spectool.export import uniform_rate
from spectool.hardware import cpu_name
from spectool.runtime import Runtime

BASELINES = ("target", "hf", "prompt-lookup")
#: Opt-in: the z-lab `dflash` package's own loop on the same DFlash checkpoint (engine-overhead comparison).
OPTIONAL_BASELINES = ("dflash-package",)
PROMPT_LOOKUP_TOKENS = 10


def machine_description(device: torch.device | None = None) -> str:
    cpu = cpu_name()
    named = f" ({cpu})" if cpu and cpu != platform.machine() else ""
    text = (
        f"{platform.system()} {platform.machine()}{named}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads"
    )
    if device is not None and device.type == "cuda":
        text += f"; {torch.cuda.get_device_name(device)}"
    return text


@dataclass
class BenchReport:
    """One bench: the draft and target, the speculative decoder's tokens/s and acceptance, each baseline's tokens/s
    and speedup, losslessness checks, the machine, and (with --profile) the cost profile; `to_json` is --json."""

    method: str | None
    verify: str
    target: str
    draft: str | None
    num_prompts: int
    max_new_tokens: int
    temperature: float
    lossless: bool | None  # None when sampling (checked statistically by the tests, not per prompt)
    mismatched_prompts: list[int]
    acceptance_length: float | None  # None when no verify round ran (every answer ended with its first token)
    tokens_per_second: float
    new_tokens: int
    baselines: dict[str, dict[str, float]]
    acceptance_histogram: dict[int, int]
    accepted_per_position: list[float]
    drafted_per_round: dict[int, int] = field(default_factory=dict)  # rounds by tokens drafted (0: a plain step)
    profile: dict[str, Any] | None = None  # `bench --profile`: what speculation costs on this machine
    max_drafts: int | None = None  # the cap on tokens drafted per round, None = the whole block / chain
    batch_size: int = 1  # prompts decoded together (one target forward per round for all of them)
    # The same check against HF generate's greedy output (the "hf" baseline); None when sampling or not run.
    lossless_vs_hf_generate: bool | None = None
    hf_mismatched_prompts: list[int] = field(default_factory=list)
    machine: str = field(default_factory=machine_description)
    prompts: str | None = None  # the prompt set: a file path or a named set (mt-bench, humaneval)
    turns: int = 1  # answers per prompt: MT-Bench's second turn follows the model's own first answer
    # Per category and per turn ("turn 2"): answers, acceptance length, tokens/s and the speedup over the target
    # alone, from the same interleaved runs.
    categories: dict[str, dict[str, float | int | None]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """No losslessness check failed (a check that did not run does not fail)."""
        return self.lossless is not False and self.lossless_vs_hf_generate is not False

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["acceptance_histogram"] = {str(k): v for k, v in sorted(self.acceptance_histogram.items())}
        data["drafted_per_round"] = {str(k): v for k, v in sorted(self.drafted_per_round.items())}
        return data


def _timed_engine(engine: Engine, ids: list[int], **kwargs: Any) -> tuple[list[int], GenerationStats]:
    start = time.perf_counter()
    rounds = list(engine.generate(ids, **kwargs))
    stats = GenerationStats(rounds, time.perf_counter() - start)
    return [t for r in rounds for t in r.tokens], stats


def run_bench(
    runtime: Runtime,
    prompts: Sequence[BenchPrompt | list[dict[str, str]]],
    *,
    max_new_tokens: int = 128,
    sampling: SamplingParams | None = None,
    baselines: Sequence[str] = BASELINES,
    seed: int = 0,
    stop_strings: Sequence[str] = (),
    max_drafts: int | None = None,
    on_prompt: Callable[[int], None] | None = None,
    batch_size: int = 1,
    profile: bool = False,
) -> BenchReport:
    """Run every prompt speculatively and with each baseline, interleaved, after one untimed warm-up.

    A `BenchPrompt` with follow-up turns gets each asked after the speculative answer to the turn before (the same
    conversation for every loop; lossless greedy answers equal the target's own). Mismatch indices count answers.
    ``stop_strings`` end answers in spectool's loops and in HF generate alike (the z-lab loop ignores them).
    ``max_drafts`` caps the tokens drafted per round (a weak draft's later block slots rarely pay for their
    verification)."""
    sampling = sampling or SamplingParams()
    prompts = [p if isinstance(p, BenchPrompt) else BenchPrompt(list(p)) for p in prompts]
    unknown = [b for b in baselines if b not in BASELINES + OPTIONAL_BASELINES]
    if unknown:
        raise UsageError(
            f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(BASELINES + OPTIONAL_BASELINES)}"
        )
    if runtime.draft is None:
        raise UsageError("bench needs a draft (--draft DIR)")
    if batch_size > 1:
        if profile:
            raise UsageError("--profile measures one prompt at a time; drop --batch-size")
        if any(p.followups for p in prompts):
            raise UsageError("later turns follow each answer one prompt at a time; with --batch-size pass --turns 1")
        settings = _Settings(max_new_tokens, sampling, max_drafts, batch_size=min(batch_size, len(prompts)))
        return _run_batched(runtime, [p.messages for p in prompts], settings, baselines, seed, stop_strings, on_prompt)
    zlab = zlab_draft(runtime) if "dflash-package" in baselines else None
    kwargs = {"max_new_tokens": max_new_tokens, "sampling": sampling, "stop_token_ids": runtime.stop_token_ids}
    hf_stops: dict[str, Any] = {}
    if stop_strings:
        kwargs["stop_strings"] = StopStrings(runtime.tokenizer.decode, list(stop_strings))
        hf_stops = {"stop_strings": kwargs["stop_strings"]}

    spec_kwargs = {**kwargs, "max_drafts": max_drafts}
    # Warm-up (allocator, lazy init) so the first timed prompt is not penalised.
    first_ids = runtime.prompt_ids(prompts[0].messages)
    _timed_engine(runtime.engine, first_ids, **{**spec_kwargs, "max_new_tokens": 8}, seed=seed)
    _timed_engine(runtime.target_engine, first_ids, **{**kwargs, "max_new_tokens": 8}, seed=seed)

    # With `--verify auto`, the same draft drafting (and verifying) all it offers is the baseline that shows the gain.
    full_block = None
    if runtime.engine.controller is not None:
        full_block = runtime.drafting_every_round().engine
        baselines = [*baselines, "full-block"]

    tally = _Tally(hf_mismatched=[] if "hf" in baselines and sampling.greedy else None)
    for index, prompt in enumerate(prompts):
        messages = list(prompt.messages)
        for turn, followup in enumerate([None, *prompt.followups], start=1):
            if followup is not None:
                messages.append({"role": "user", "content": followup})
            ids = runtime.prompt_ids(messages)
            answer = tally.answers
            run = _PromptRun(runtime, ids, seed + answer, max_new_tokens, sampling, kwargs, spec_kwargs, hf_stops)
            before = tally.snapshot()
            out = run.measure(tally, answer, baselines, full_block, zlab)
            tally.record([prompt.category, f"turn {turn}"] if prompt.followups else [prompt.category], before)
            messages.append({"role": "assistant", "content": runtime.tokenizer.decode(out, skip_special_tokens=True)})
            tally.answers += 1
        if on_prompt:
            on_prompt(index)

    report = _report(runtime, tally, baselines, _Settings(max_new_tokens, sampling, max_drafts))
    report.turns = max(p.turns for p in prompts)
    report.categories = tally.breakdown() if len(tally.parts) > 1 or report.turns > 1 else {}
    if profile:
        report.profile = cost_profile(
            runtime, tally.rounds + tally.full_rounds
        )  # auto drafts rarely: the full rounds count too
    return report


@dataclass
class _Part:
    """One category's (or turn's) share of a bench: its answers, the speculative loop's tokens, seconds and rounds,
    and the target alone's tokens and seconds on the same answers."""

    answers: int = 0
    tokens: float = 0.0
    seconds: float = 0.0
    target_tokens: int = 0
    target_seconds: float = 0.0
    rounds: list[Any] = field(default_factory=list)


@dataclass
class _Tally:
    """What the interleaved runs of a bench add up to: the draft's tokens, seconds and rounds; each baseline's tokens
    and seconds; the rounds of the same draft drafting fully and of the z-lab loop; the prompts whose greedy answers
    differ from the target's (and from HF generate's, None when that is not checked)."""

    hf_mismatched: list[int] | None
    answers: int = 0
    spec_tokens: float = 0.0
    spec_seconds: float = 0.0
    rounds: list[Any] = field(default_factory=list)
    full_rounds: list[Any] = field(default_factory=list)
    zlab_rounds: list[tuple[int, int]] = field(default_factory=list)  # (tokens after the first, verify forwards)
    seconds: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)
    mismatched: list[int] = field(default_factory=list)
    parts: dict[str, _Part] = field(default_factory=lambda: defaultdict(_Part))  # per category / turn

    def add(self, name: str, out: Sequence[int], seconds: float) -> None:
        self.seconds[name] += seconds
        self.tokens[name] += len(out)

    def snapshot(self) -> tuple[float, float, int, int, float]:
        return self.spec_tokens, self.spec_seconds, len(self.rounds), self.tokens["target"], self.seconds["target"]

    def record(self, keys: Sequence[str], before: tuple[float, float, int, int, float]) -> None:
        """Add the answer measured since `before` to each of `keys` (its category, its turn)."""
        spec_tokens, spec_seconds, rounds, target_tokens, target_seconds = before
        for key in keys:
            part = self.parts[key or "all"]
            part.answers += 1
            part.tokens += self.spec_tokens - spec_tokens
            part.seconds += self.spec_seconds - spec_seconds
            part.target_tokens += self.tokens["target"] - target_tokens
            part.target_seconds += self.seconds["target"] - target_seconds
            part.rounds += self.rounds[rounds:]

    def breakdown(self) -> dict[str, dict[str, float | int | None]]:
        table: dict[str, dict[str, float | int | None]] = {}
        for key, part in sorted(self.parts.items()):
            stats = GenerationStats(part.rounds, part.seconds)
            tps = part.tokens / part.seconds if part.seconds else 0.0
            target_tps = part.target_tokens / part.target_seconds if part.target_seconds else None
            table[key] = {
                "answers": part.answers,
                "acceptance_length": stats.acceptance_length if stats.verify_rounds else None,
                "tokens_per_second": tps,
                "speedup_over_target": tps / target_tps if target_tps else None,
            }
        return table


@dataclass
class _PromptRun:
    """One prompt run speculatively and by each baseline, one after the other."""

    runtime: Runtime
    ids: list[int]
    seed: int
    max_new_tokens: int
    sampling: SamplingParams
    kwargs: dict[str, Any]
    spec_kwargs: dict[str, Any]
    hf_stops: dict[str, Any]

    def measure(self, tally: _Tally, index: int, baselines: Sequence[str], full_block: Any, zlab: Any) -> list[int]:
        """Time the prompt in every loop; returns the speculative answer's tokens. The speculative loop and the
        target alone take turns going first (prompt by prompt), so neither always runs after another loop's work."""
        runtime, ids, sampling = self.runtime, self.ids, self.sampling
        reference = ref_stats = None
        needs_reference = "target" in baselines or sampling.greedy
        if needs_reference and index % 2 == 1:
            reference, ref_stats = _timed_engine(runtime.target_engine, ids, **self.kwargs, seed=self.seed)
        out, stats = _timed_engine(runtime.engine, ids, **self.spec_kwargs, seed=self.seed)
        tally.spec_tokens += len(out)
        tally.spec_seconds += stats.seconds
        tally.rounds += stats.rounds
        if needs_reference:
            if reference is None:
                reference, ref_stats = _timed_engine(runtime.target_engine, ids, **self.kwargs, seed=self.seed)
            tally.add("target", reference, ref_stats.seconds)
            if sampling.greedy and out != reference:
                tally.mismatched.append(index)
        if full_block is not None:
            full_out, full_stats = _timed_engine(full_block, ids, **self.spec_kwargs, seed=self.seed)
            tally.add("full-block", full_out, full_stats.seconds)
            tally.full_rounds += full_stats.verify_rounds
        if zlab is not None:
            z_out, z_seconds, z_rounds = timed_zlab(zlab, runtime, ids, self.max_new_tokens, sampling)
            tally.add("dflash-package", z_out, z_seconds)
            tally.zlab_rounds.append(z_rounds)
        if "hf" in baselines:
            hf_out, hf_seconds = timed_hf(runtime, ids, self.max_new_tokens, sampling, **self.hf_stops)
            tally.add("hf", hf_out, hf_seconds)
            if tally.hf_mismatched is not None and out != hf_out:
                tally.hf_mismatched.append(index)
        if "prompt-lookup" in baselines:
            pl_out, pl_seconds = timed_hf(
                runtime, ids, self.max_new_tokens, sampling, prompt_lookup_num_tokens=PROMPT_LOOKUP_TOKENS,
                **self.hf_stops,
            )  # fmt: skip
            tally.add("prompt-lookup", pl_out, pl_seconds)
        return out


def _speedups(tps: float, baselines: Sequence[str], tokens: Counter, seconds: Counter) -> dict[str, dict[str, float]]:
    table = {}
    for name in baselines:
        base_tps = tokens[name] / seconds[name] if seconds[name] else 0.0
        table[name] = {"tokens_per_second": base_tps, "speedup": tps / base_tps if base_tps else 0.0}
    return table


@dataclass(frozen=True)
class _Settings:
    """How a bench decoded: tokens per answer, sampling, the cap on drafted tokens per round, and how many prompts
    were decoded together."""

    max_new_tokens: int
    sampling: SamplingParams
    max_drafts: int | None
    batch_size: int = 1


def _report(runtime: Runtime, tally: _Tally, baselines: Sequence[str], settings: _Settings) -> BenchReport:
    """The report of a bench's runs (one prompt at a time or batched): tokens/s and speedups over each baseline,
    acceptance, and the losslessness checks (`tally.mismatched`: answers whose greedy tokens differ from the
    target's through spectool's loop; `tally.hf_mismatched`: from HF generate's, None when not checked)."""
    summary = GenerationStats(tally.rounds, tally.spec_seconds)
    tps = tally.spec_tokens / tally.spec_seconds if tally.spec_seconds else 0.0
    table = _speedups(tps, baselines, tally.tokens, tally.seconds)
    if tally.full_rounds:
        table["full-block"]["acceptance_length"] = GenerationStats(tally.full_rounds).acceptance_length
    if tally.zlab_rounds:  # its own acceptance length, to show both loops accept the same
        verified = sum(f for _, f in tally.zlab_rounds)
        accepted_tokens = sum(t for t, _ in tally.zlab_rounds)
        table["dflash-package"]["acceptance_length"] = accepted_tokens / verified if verified else None
    accepted, drafted = summary.accepted_per_position()
    draft, sampling = runtime.draft, settings.sampling
    return BenchReport(
        method=draft.method,
        verify="auto" if "full-block" in table else "full",
        target=runtime.info.ref,
        draft=str(draft.path),
        num_prompts=tally.answers,
        max_new_tokens=settings.max_new_tokens,
        temperature=sampling.temperature,
        lossless=(not tally.mismatched) if sampling.greedy else None,
        mismatched_prompts=tally.mismatched,
        acceptance_length=summary.acceptance_length if summary.verify_rounds else None,
        tokens_per_second=tps,
        new_tokens=int(tally.spec_tokens),
        baselines=table,
        acceptance_histogram=dict(Counter(len(r.tokens) for r in summary.verify_rounds)),
        drafted_per_round=dict(Counter(r.num_drafted for r in summary.verify_rounds)),
        accepted_per_position=[a / d if d else 0.0 for a, d in zip(accepted, drafted, strict=True)],
        max_drafts=settings.max_drafts,
        batch_size=settings.batch_size,
        lossless_vs_hf_generate=(not tally.hf_mismatched) if tally.hf_mismatched is not None else None,
        hf_mismatched_prompts=tally.hf_mismatched or [],
        machine=machine_description(runtime.model.device),
    )


#: Baselines that can run a batch of prompts at once (HF prompt lookup and the z-lab loop take one prompt).
BATCH_BASELINES = ("target", "hf")


def _run_batched(
    runtime: Runtime,
    prompts: Sequence[list[dict[str, str]]],
    settings: _Settings,
    baselines: Sequence[str],
    seed: int,
    stop_strings: Sequence[str],
    on_prompt: Callable[[int], None] | None,
) -> BenchReport:
    """`run_bench` with `settings.batch_size` prompts decoded together, by the speculative loop and by each
    baseline."""
    from spectool.decoding.batch import BatchEngine
    from spectool.decoding.proposers import EagleTreeProposer

    unsupported = [b for b in baselines if b not in BATCH_BASELINES]
    if unsupported:
        raise UsageError(
            f"baseline(s) {', '.join(unsupported)} decode one prompt at a time; with --batch-size choose from "
            f"{', '.join(BATCH_BASELINES)}"
        )
    if runtime.engine.scheduler is not None:
        raise UsageError("--verify auto decodes one prompt at a time; drop --batch-size or use --verify full")
    proposer = runtime.engine.proposer  # the same proposer drafts for one prompt or a batch
    if isinstance(proposer, EagleTreeProposer):
        raise UsageError("--tree decodes one prompt at a time; drop --batch-size or --tree")
    spec = BatchEngine(runtime.engine.session.target, proposer)
    alone = BatchEngine(runtime.target_engine.session.target)
    encoded = [runtime.prompt_ids(p) for p in prompts]
    sampling, size, max_drafts = settings.sampling, settings.batch_size, settings.max_drafts
    kwargs: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "sampling": sampling}
    kwargs["stop_token_ids"] = runtime.stop_token_ids
    if stop_strings:
        kwargs["stop_strings"] = StopStrings(runtime.tokenizer.decode, list(stop_strings))
    groups = [encoded[i : i + size] for i in range(0, len(encoded), size)]
    spec.generate(groups[0], **{**kwargs, "max_new_tokens": 8}, max_drafts=max_drafts, seed=seed)  # warm-up
    alone.generate(groups[0], **{**kwargs, "max_new_tokens": 8}, seed=seed)

    tally = _Tally(hf_mismatched=[] if "hf" in baselines and sampling.greedy else None)  # None: not checked
    for number, group in enumerate(groups):
        first = number * size
        start = time.perf_counter()
        rows = spec.generate(group, **kwargs, max_drafts=max_drafts, seed=seed + first)
        tally.spec_seconds += time.perf_counter() - start
        tally.spec_tokens += sum(len(r.tokens) for r in rows)
        tally.rounds += [event for r in rows for event in r.rounds]
        tally.answers += len(group)
        if "target" in baselines or sampling.greedy:
            start = time.perf_counter()
            reference = alone.generate(group, **kwargs, seed=seed + first)
            tally.seconds["target"] += time.perf_counter() - start
            tally.tokens["target"] += sum(len(r.tokens) for r in reference)
            if sampling.greedy:
                tally.mismatched += [
                    first + i for i, (a, b) in enumerate(zip(rows, reference, strict=True)) if a.tokens != b.tokens
                ]
        if "hf" in baselines:
            answers, hf_seconds = timed_hf_batch(
                runtime, group, settings.max_new_tokens, sampling, kwargs.get("stop_strings")
            )
            tally.seconds["hf"] += hf_seconds
            tally.tokens["hf"] += sum(len(a) for a in answers)
            if tally.hf_mismatched is not None:
                tally.hf_mismatched += [
                    first + i for i, (a, b) in enumerate(zip(rows, answers, strict=True)) if a.tokens != b
                ]
        if on_prompt:
            for index in range(first, first + len(group)):
                on_prompt(index)
    return _report(runtime, tally, baselines, settings)


#: Acceptance lengths for which `cost_profile` gives the speedup a full-length round would reach here.
PROFILE_TAUS = (1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)


def cost_profile(runtime: Runtime, rounds: Sequence[Any]) -> dict[str, Any]:
    """What speculation costs on this machine, for `bench --profile`: the target's verify curve V(n)/V(1) (n tokens
    in one forward), the draft's cost per round (measured in this run's drafting rounds), for each number of
    drafted tokens k the acceptance it needs to break even with plain target steps, and the speedup a full round
    would give at several acceptance lengths."""
    from spectool.decoding.draft_length import profile_verify_cost

    engine = runtime.engine
    proposer = engine.proposer
    width = (proposer.tree_size or proposer.max_drafts) + 1
    # `--verify auto` profiled the same curve at start-up and decided by it; otherwise profile it now.
    profile = engine.controller.profile if engine.controller is not None else profile_verify_cost(engine.session, width)
    step = profile.seconds[0]
    drafting = [r for r in rounds if r.num_drafted > 0]
    if proposer.per_token_drafting:
        per_token = sum(r.draft_seconds for r in drafting) / max(1, sum(r.num_drafted for r in drafting))
        draft_cost = [per_token * k for k in range(width)]
    else:
        per_round = sum(r.draft_seconds for r in drafting) / max(1, len(drafting))
        draft_cost = [0.0] + [per_round] * (width - 1)
    rows = []
    for k in range(1, width):
        if proposer.tree_size is not None and k != width - 1:
            continue  # a tree is verified whole
        needed = (draft_cost[k] + profile.seconds[min(k, len(profile.seconds) - 1)]) / step  # E(k) to break even
        rows.append(
            {
                "drafted": k,
                "verify_cost": round(profile.seconds[k] / step, 3) if k < len(profile.seconds) else None,
                "break_even_tokens": round(needed, 3),
                "break_even_rate": _uniform_rate(needed, k),
            }
        )
    full = draft_cost[-1] + profile.seconds[-1]
    weight_bytes = step_weight_bytes(runtime.model)
    bandwidth = memory_bandwidth(runtime.model.device)
    plan = getattr(engine.session, "kernel_plan", None)  # the lean forward's matrix kernels (None: transformers')
    return {
        "kernels": plan.summary() if plan is not None else None,
        "step_seconds": step,
        "step_ms": round(step * 1000, 3),
        # The machine's limit: a step reads every weight once, so it takes at least bytes / bandwidth.
        "weight_bytes_per_step": weight_bytes,
        "memory_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "floor_ms": round(weight_bytes / bandwidth * 1000, 3),
        "step_over_floor": round(step / (weight_bytes / bandwidth), 3),
        "verify_curve": [round(s / step, 3) for s in profile.seconds],  # V(n) / V(1), n = 1..
        # A whole drafting round (every slot of the block, or a full chain), in seconds and in target steps.
        "draft_seconds": draft_cost[-1] if proposer.per_token_drafting else draft_cost[1],
        "draft_cost": round((draft_cost[-1] if proposer.per_token_drafting else draft_cost[1]) / step, 3),
        # The same per drafted token (a chain drafts one token per draft forward; a block all of them in one).
        "draft_steps_per_token": round(
            (draft_cost[-1] if proposer.per_token_drafting else draft_cost[1]) / (width - 1) / step, 3
        ),
        "per_token_drafting": bool(proposer.per_token_drafting),
        "drafting_rounds_measured": len(drafting),
        "break_even": rows,
        "speedup_at_acceptance_length": {str(tau): round(tau * step / full, 3) for tau in PROFILE_TAUS if tau <= width},
    }


def _uniform_rate(expected: float, k: int) -> float | None:
    """The acceptance rate, the same at every position, that breaks even (None when even r = 1 falls short)."""
    return None if expected > k + 1 else round(uniform_rate(expected, k), 3)
