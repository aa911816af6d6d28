"""DSpark's hardware-aware prefix scheduler: verify only the profitable prefix of a drafted block.

The confidence head gives, per slot, the logit that the slot is accepted given the earlier slots were; the
survival of draft position j is `a_j = prod_{i<=j} sigmoid(c_i / T_i)` (T_i: calibration temperatures, 1 when
uncalibrated). A round verifying n tokens costs `D + V(n)`: V(n) is the target's verify forward (profiled once on
this machine), D the drafting that precedes it (measured on the live loop, averaged). The scheduler starts from
n = 1 (the anchor alone, expected tokens tau* = 1) and admits positions in order while `tau* / (D + V(n))`
(expected tokens per second) keeps improving, stopping at the first non-improvement. The decision reads the
draft and the clock only, never the target's verdict, so verification stays lossless.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spectool.target import home_device


@dataclass(frozen=True)
class VerifyCostProfile:
    """Median seconds of one target forward over n new tokens (n = 1..len) after a fixed context."""

    seconds: tuple[float, ...]  # seconds[n - 1]
    context_length: int

    def steps_per_second(self, num_tokens: int) -> float:
        index = min(max(num_tokens, 1), len(self.seconds)) - 1
        return 1.0 / self.seconds[index]


#: Seconds the verify-cost profile (the start-up of ``--verify auto``) aims to spend timing forwards.
PROFILE_BUDGET_SECONDS = 6.0


def profiled_sizes(max_tokens: int, count: int) -> list[int]:
    """``count`` sizes (at least 2) from 1 to ``max_tokens``, spaced geometrically so small sizes, where the
    verify cost bends, are dense; every size when ``count >= max_tokens``."""
    if count >= max_tokens or max_tokens <= 2:
        return list(range(1, max_tokens + 1))
    count = max(2, count)
    return sorted({round(max_tokens ** (i / (count - 1))) for i in range(count)} | {1, max_tokens})


@torch.no_grad()
def profile_verify_cost(
    session,
    max_tokens: int,
    *,
    context_length: int = 64,
    repeats: int = 7,
    budget_seconds: float = PROFILE_BUDGET_SECONDS,
    seed: int = 0,
) -> VerifyCostProfile:
    """Time `session` (the engine's target session: `forward` / `crop` / `reset`) verifying 1..max_tokens tokens
    after `context_length` cached tokens: the median of up to `repeats` sweeps over the sizes (interleaved, so a
    drift of the machine's speed touches every size alike), made non-decreasing (a forward over more tokens never
    costs less; a dip is noise); the session is reset afterwards.

    The sweeps stop once `budget_seconds` is spent (always one at least). When the warm-up forwards (1 and
    max_tokens tokens) say a sweep over every size would not fit the budget, e.g. a large target on a CPU, only
    a geometric selection of sizes is timed (1 and max_tokens included) and the sizes between are interpolated
    linearly."""
    device = home_device(session.model)
    vocab = session.model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    context = torch.randint(0, vocab, (1, context_length), generator=generator).to(device)
    block = torch.randint(0, vocab, (1, max_tokens), generator=generator).to(device)

    def timed(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        session.forward(block[:, :n])
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        session.crop(context_length)
        return seconds

    session.reset()
    session.forward(context)
    timed(1)  # warm-up
    smallest, largest = timed(1), timed(max_tokens)
    mean_cost = max((smallest + largest) / 2, 1e-9)  # a forward's cost grows about linearly with its tokens
    sizes = profiled_sizes(max_tokens, int(budget_seconds / mean_cost))
    samples: dict[int, list[float]] = {n: [] for n in sizes}
    began = time.perf_counter()
    for sweep in range(max(1, repeats)):
        for n in sizes:
            samples[n].append(timed(n))
        spent = time.perf_counter() - began
        if spent * (sweep + 2) / (sweep + 1) > budget_seconds:  # the next sweep would overrun
            break
    session.reset()
    measured = {n: statistics.median(timings) for n, timings in samples.items()}
    seconds, highest = [], 0.0
    for n in range(1, max_tokens + 1):
        if n not in measured:
            below = max(m for m in measured if m < n)
            above = min(m for m in measured if m > n)
            share = (n - below) / (above - below)
            measured[n] = measured[below] + share * (measured[above] - measured[below])
        highest = max(highest, measured[n])
        seconds.append(highest)
    return VerifyCostProfile(tuple(seconds), context_length)


class PrefixScheduler:
    """Chooses how many drafted tokens to verify from the confidence logits of a block."""

    #: weight of the newest drafting time in the running average
    DRAFT_TIME_WEIGHT = 0.1

    def __init__(
        self,
        profile: VerifyCostProfile,
        temperatures: Sequence[float] | None = None,
        draft_seconds: float | None = None,
    ) -> None:
        self.profile = profile
        self.temperatures = list(temperatures) if temperatures else None
        self.draft_seconds = draft_seconds  # D: None until a round has been timed
        self.verify_seconds = lambda n: 1.0 / profile.steps_per_second(n)  # V(n); `follow` swaps in a live one

    def follow(self, controller: DraftLengthController) -> None:
        """Read V(n) from `controller`, whose live verify forwards rescale the start-up profile, so the block's
        cut and the draft length are chosen against the same costs."""
        self.verify_seconds = controller.verify_seconds

    def observe_draft(self, seconds: float) -> None:
        """Fold one round's measured drafting time into D."""
        if self.draft_seconds is None:
            self.draft_seconds = seconds
        else:
            self.draft_seconds += self.DRAFT_TIME_WEIGHT * (seconds - self.draft_seconds)

    def round_seconds(self, num_tokens: int) -> float:
        """D + V(n): a round that verifies `num_tokens` tokens (the anchor included)."""
        return (self.draft_seconds or 0.0) + self.verify_seconds(num_tokens)

    def admission(self) -> Admission:
        """A fresh left-to-right decision for one block: what lets a proposer stop drafting the block at the first
        slot the scheduler would cut."""
        return Admission(self)

    def prefix_length(self, confidence_logits: torch.Tensor) -> int:
        """Number of drafted tokens to verify (0 = the anchor alone)."""
        admission = self.admission()
        for value in confidence_logits.float().flatten().tolist():
            if not admission.admit(value):
                break
        return admission.admitted


class Admission:
    """Admits a block's drafted positions one at a time, in order, while ``tau* / (D + V(n))`` keeps improving."""

    def __init__(self, scheduler: PrefixScheduler) -> None:
        self.round_seconds = scheduler.round_seconds
        self.temperatures = scheduler.temperatures or []
        self.expected = 1.0  # tau*: the anchor's token is always produced
        self.survival = 1.0
        self.admitted = 0
        self.best = 1.0 / self.round_seconds(1)

    def admit(self, confidence_logit: float) -> bool:
        """Whether the next position (its confidence logit given) is verified too; False ends the block."""
        j = self.admitted
        temperature = self.temperatures[j] if j < len(self.temperatures) else 1.0
        survival = self.survival / (1.0 + math.exp(-confidence_logit / temperature))
        candidate = (self.expected + survival) / self.round_seconds(j + 2)
        if candidate <= self.best:
            return False  # the first non-improvement ends the search (non-anticipating, hence lossless)
        self.expected, self.best, self.survival, self.admitted = self.expected + survival, candidate, survival, j + 1
        return True


#: Temperatures tried per position by `calibrate_temperatures` (log-spaced, 1 included).
CALIBRATION_GRID = tuple(round(2 ** (k / 4), 4) for k in range(-12, 13))


def expected_calibration_error(predicted: torch.Tensor, observed: torch.Tensor, bins: int = 10) -> float:
    """ECE of probabilities ``predicted`` [n] against 0/1 outcomes ``observed`` [n]: equal-width bins, each
    weighted by its share of the samples."""
    index = (predicted * bins).long().clamp(max=bins - 1)
    error = 0.0
    for b in index.unique().tolist():
        inside = index == b
        error += float(inside.float().mean()) * abs(float(predicted[inside].mean()) - float(observed[inside].mean()))
    return error


def calibrate_temperatures(
    confidence_logits: torch.Tensor, accepted: torch.Tensor, supervised: torch.Tensor
) -> list[float]:
    """Sequential temperature scaling: left to right, the temperature of position j minimises the ECE of
    the survival ``a_j = prod_{i<=j} sigmoid(c_i / T_i)`` against "slots 1..j all accepted", earlier positions'
    temperatures fixed.

    ``confidence_logits``, ``accepted`` (the slot's own verdict, teacher-forced) and ``supervised`` are
    ``[N, K]`` over N blocks; a block counts for position j while its slots 1..j are supervised. Positions with
    no supervised block keep temperature 1.
    """
    logits, accepted, supervised = confidence_logits.float(), accepted.bool(), supervised.bool()
    survived = accepted.long().cumprod(1).bool()
    valid = supervised.long().cumprod(1).bool()
    temperatures: list[float] = []
    prefix = torch.ones(logits.shape[0])
    for j in range(logits.shape[1]):
        rows = valid[:, j]
        if not rows.any():
            temperatures.append(1.0)
            continue
        observed, earlier, position_logits = survived[rows, j].float(), prefix[rows], logits[rows, j]
        errors = {
            t: expected_calibration_error(earlier * torch.sigmoid(position_logits / t), observed)
            for t in CALIBRATION_GRID
        }
        best = min(CALIBRATION_GRID, key=lambda t: (errors[t], abs(t - 1.0)))  # ties: the temperature nearest 1
        temperatures.append(float(best))
        prefix = prefix * torch.sigmoid(logits[:, j] / best)
    return temperatures


class DraftLengthController:
    """`--verify auto` for every method: how many tokens to draft in the next round, 0 meaning a plain target step
    with no draft forward at all.

    The choice maximises expected tokens per second, ``E(k) / (D(k) + V(k + 1))``: ``V(n)`` is the target's verify
    forward over n tokens (profiled on this machine), ``D(k)`` the drafting of k tokens (measured on the live loop:
    one forward for a whole block, one per token for a chain), and ``E(k) = 1 + sum_{j<=k} prod_{i<=j} r_i`` with
    ``r_i`` the running acceptance rate of draft position i given the earlier ones were accepted. A k = 0 round
    yields ``1 / V(1)``. A tree (EAGLE-2) is all or nothing: its running tokens per round against a plain step.

    While drafting does not pay, the controller still probes now and then (every `probe_every`-th round), so it
    notices when the draft starts to pay: a block or tree drafts whole, and the interval doubles, up to
    `max_probe_every`, each time such a probe confirms it; a chain drafts one token, at its interval. The
    decision reads past rounds and the clock only, never the current round's verdict, so decoding stays lossless.
    """

    #: the newest observation's weight in the running estimates, once they hold 1 / DECAY observations
    DECAY = 0.05
    #: drafting must promise this much more throughput than a plain target step: estimates from a noisy clock and
    #: a few rounds should not flip a loop that gains nothing measurable into one that may lose
    MARGIN = 1.05
    #: the first position's acceptance rate before any observation; a later position starts from the rate of the
    #: one before it (acceptance falls along a draft), each counted as PRIOR_WEIGHT observations
    PRIOR_RATE = 0.5
    PRIOR_WEIGHT = 2.0

    def __init__(
        self,
        profile: VerifyCostProfile,
        *,
        per_token_drafting: bool,
        tree: bool = False,
        probe_every: int = 16,
        max_probe_every: int = 256,
    ) -> None:
        self.profile = profile
        self.per_token_drafting = per_token_drafting and not tree  # chains: D(k) = k x one step; blocks: one forward
        self.tree = tree
        self.probe_every = self.base_probe_every = probe_every
        self.max_probe_every = max_probe_every
        self.draft_seconds = _RunningMean(self.DECAY)  # a block / tree round, or one chain step (on average)
        # A chain's first token costs its feed over the committed positions too; each further token one draft step
        self.first_seconds = _RunningMean(self.DECAY)
        self.next_seconds = _RunningMean(self.DECAY)
        self.rates: list[_RunningMean] = []  # r_i: acceptance of position i given positions < i were accepted
        self.paying_rounds = 0  # drafting rounds in a row chosen because they pay (not probes)
        self.tree_tokens = _RunningMean(self.DECAY)  # tokens per tree round (accepted + the target's own)
        # Live verify forwards against the profile: a machine that got busier (or quieter) since start-up moves
        # V(n) and the draft's cost together, and the choice depends on their ratio.
        self.verify_scale = _RunningMean(self.DECAY, prior=1.0)
        self.plain_rounds = 0  # k = 0 rounds since the last draft
        self.probing = False
        self.rounds = 0  # rounds chosen so far
        self.last_seen: dict[int, int] = {}  # position -> the round its rate was last observed in
        self.longest_draft = 0  # the most tokens any round drafted: a steady round catches up at most that + 1

    def new_answer(self) -> None:
        """A new answer begins: each running estimate, which follows the text of the answer before, restarts from
        its mean over every round so far. A draft's acceptance differs far more between answers than the running
        estimates can follow while plain steps probe now and then (SmolLM2's EAGLE-3 draft on HumanEval: first-slot
        rates of 0.12 to 0.63 from one answer to the next), so one hard answer kept the next ones from drafting."""
        for mean in (*self.rates, self.tree_tokens):
            mean.restart_from_overall_mean()
        self.last_seen = dict.fromkeys(range(len(self.rates)), self.rounds)  # each estimate is as of now

    def verify_seconds(self, num_tokens: int) -> float:
        """V(n): the profiled verify forward over n tokens, scaled by what the live rounds measure."""
        return self.verify_scale.value / self.profile.steps_per_second(num_tokens)

    def observe_verify(self, num_tokens: int, seconds: float) -> None:
        """Fold in a live verify forward over ``num_tokens`` tokens that took ``seconds``."""
        expected = 1.0 / self.profile.steps_per_second(num_tokens)
        if expected > 0 and seconds > 0:
            self.verify_scale.add(seconds / expected)

    def draft_cost(self, k: int) -> float:
        """D(k): a block or tree costs one forward; a chain its first token (when measured apart: the feed over
        the committed positions and one step) plus a step per further token (until those are measured, the first
        token's cost)."""
        if k == 0 or self.draft_seconds.value is None:
            return 0.0
        if not self.per_token_drafting:
            return self.draft_seconds.value
        first = self.first_seconds.value
        if first is None:
            return self.draft_seconds.value * k
        further = self.next_seconds.value if self.next_seconds.value is not None else first
        return first + (k - 1) * further

    def acceptance_rates(self, k: int) -> list[float]:
        """r_0 .. r_{k-1}, each shrunk towards the position before it while it has few observations (a rarely
        reached late position would otherwise keep an optimistic prior)."""
        rates, prior = [], self.PRIOR_RATE
        for position in range(k):
            mean = self.rates[position] if position < len(self.rates) else None
            if mean is None or mean.value is None:
                rate = prior
            else:
                weight = self.PRIOR_WEIGHT if mean.count < 1 / self.DECAY else 0.0
                rate = (mean.count * mean.value + weight * prior) / (mean.count + weight)
            rates.append(rate)
            prior = rate
        return rates

    def expected_tokens(self, k: int) -> float:
        """E(k): expected tokens of a round that drafts k (the target's own token included)."""
        if self.tree:
            return 1.0 if k == 0 else (self.tree_tokens.value or 1.0)
        expected, survival = 1.0, 1.0
        for rate in self.acceptance_rates(k):
            survival *= rate
            expected += survival
        return expected

    def tokens_per_second(self, k: int, tree_size: int | None = None) -> float:
        """Expected throughput of a round that drafts k (a tree: verifies its ``tree_size`` nodes when k > 0)."""
        verified = 1 + (tree_size if self.tree and k > 0 and tree_size is not None else k)
        return self.expected_tokens(k) / (self.draft_cost(k) + self.verify_seconds(verified))

    def best(self, limit: int, tree_size: int | None = None) -> int:
        """The draft length in 0..limit with the highest expected throughput (ties: the shorter; a plain step
        unless drafting beats it by MARGIN); a tree: limit or 0."""
        plain = self.tokens_per_second(0) * self.MARGIN
        if self.tree:
            return limit if self.tokens_per_second(limit, tree_size) > plain else 0
        best_k, best, expected, survival = 0, plain, 1.0, 1.0
        for k, rate in enumerate(self.acceptance_rates(limit), start=1):
            survival *= rate
            expected += survival
            score = expected / (self.draft_cost(k) + self.verify_seconds(k + 1))
            if score > best:  # strictly better: ties keep the shorter draft
                best_k, best = k, score
        return best_k

    def choose(self, limit: int, tree_size: int | None = None) -> int:
        """Tokens to draft next round (at most ``limit``; a tree: ``limit`` or 0)."""
        self.probing = False
        self.rounds += 1
        if limit <= 0:
            return 0
        if self.draft_seconds.value is None:  # nothing measured yet: draft fully to measure (not a probe: a
            return limit  # first round's catch-up over the prompt is not counted, so this may take two rounds)
        k = self.best(limit, tree_size)
        if k > 0:
            self.plain_rounds = 0
            self.paying_rounds += 1
            if self.paying_rounds >= self.base_probe_every:  # drafting has paid for a while: probe eagerly again
                self.probe_every = self.base_probe_every
            if k < limit and not self.tree and self.paying_rounds % self.base_probe_every == 0:
                return k + 1  # explore one position further now and then: its estimate may be stale
            return k
        self.paying_rounds = 0
        self.plain_rounds += 1
        if self.plain_rounds >= self.probe_every:
            self.probing = True
            self.plain_rounds = 0
            # A chain probes its first position: the cheapest round that tells whether any draft pays (a longer
            # one pays only through it). A block or a tree costs one forward whatever its size: it drafts whole.
            return 1 if self.per_token_drafting else limit
        return 0

    def observe(
        self,
        drafted: int,
        accepted: int,
        draft_seconds: float,
        tree_size: int | None = None,
        *,
        ran: bool | None = None,
        catch_up: int = 1,
        first_seconds: float | None = None,
    ) -> None:
        """Fold in a round that drafted ``drafted`` tokens (a tree: ``tree_size`` nodes, ``drafted`` deep) of which
        ``accepted`` were accepted, drafting in ``draft_seconds``.

        ``ran``: the draft forward ran (default: ``drafted > 0``); a block whose confidence cut admitted no slot
        ran for nothing, which counts as its cost and as a miss at the first position. ``catch_up``: the committed
        positions the draft had to read first; a round after plain steps (or the prompt) reads more than a
        steady round ever does, so its time says nothing about the cost of drafting and is not counted.
        ``first_seconds``: of ``draft_seconds``, what a chain's first token took (its feed and one step)."""
        ran = drafted > 0 if ran is None else ran
        if not ran:
            return
        if catch_up <= self.longest_draft + 1:
            self.draft_seconds.add(draft_seconds / max(drafted, 1) if self.per_token_drafting else draft_seconds)
            if self.per_token_drafting and first_seconds is not None:
                self.first_seconds.add(first_seconds)
                if drafted > 1:
                    self.next_seconds.add(max(0.0, draft_seconds - first_seconds) / (drafted - 1))
        self.longest_draft = max(self.longest_draft, drafted)
        if self.tree:
            self.tree_tokens.add(accepted + 1.0)
        else:
            for j in range(min(max(drafted, 1), accepted + 1)):  # positions reached: all before them accepted
                while j >= len(self.rates):
                    self.rates.append(_RunningMean(self.DECAY))
                # an observation after a gap (a probe after plain rounds) weighs the rounds it stands for
                elapsed = max(1, self.rounds - self.last_seen.get(j, 0))
                self.rates[j].add(1.0 if j < accepted else 0.0, elapsed)
                self.last_seen[j] = self.rounds
        if self.probing and not self.per_token_drafting and self.best(max(drafted, 1), tree_size) == 0:
            # A block or tree probe that shows drafting still does not pay: wait twice as long for the next one
            # (one that pays lets the draft run; the interval comes back down once drafting has paid a while). A
            # chain's one-token probe costs a fraction of a step, so it keeps its interval: a first-position rate
            # estimated from a handful of probes is too noisy to stop looking (a draft accepted in a third of its
            # first positions could read 0.14 after seven probes and never draft again).
            self.probe_every = min(self.max_probe_every, self.probe_every * 2)


class _RunningMean:
    """The mean of what was added (a ``prior`` counting as one observation) until it holds 1 / decay values, then
    an exponential moving average with weight ``decay``: quick to settle, and then following drift."""

    def __init__(self, decay: float, prior: float | None = None) -> None:
        self.decay = decay
        self.value = prior
        self.count = 0 if prior is None else 1
        self.observed, self.total = 0, 0.0  # every observation so far, with no decay and no prior

    def add(self, observation: float, elapsed: int = 1) -> None:
        """Fold in an observation made `elapsed` rounds after the one before (each round between would have
        moved the average by the decay)."""
        self.count += 1
        self.observed, self.total = self.observed + 1, self.total + observation
        if self.value is None:
            self.value = observation
        else:
            weight = max(self.decay, 1.0 / self.count)
            if elapsed > 1:
                weight = 1.0 - (1.0 - weight) ** elapsed
            self.value += weight * (observation - self.value)

    def restart_from_overall_mean(self) -> None:
        """Set the value to the plain mean of every observation so far (kept as it is before the first)."""
        if self.observed:
            self.value = self.total / self.observed
