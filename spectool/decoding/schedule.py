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


@dataclass(frozen=True)
class VerifyCostProfile:
    """Median seconds of one target forward over n new tokens (n = 1..len) after a fixed context."""

    seconds: tuple[float, ...]  # seconds[n - 1]
    context_length: int

    def steps_per_second(self, num_tokens: int) -> float:
        index = min(max(num_tokens, 1), len(self.seconds)) - 1
        return 1.0 / self.seconds[index]


@torch.no_grad()
def profile_verify_cost(
    session, max_tokens: int, *, context_length: int = 64, repeats: int = 5, seed: int = 0
) -> VerifyCostProfile:
    """Time `session` (the engine's target session: `forward` / `crop` / `reset`) verifying 1..max_tokens tokens
    after `context_length` cached tokens (median of repeats); the session is reset afterwards."""
    device = next(session.model.parameters()).device
    vocab = session.model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    context = torch.randint(0, vocab, (1, context_length), generator=generator).to(device)
    block = torch.randint(0, vocab, (1, max_tokens), generator=generator).to(device)
    session.reset()
    session.forward(context)
    session.forward(block[:, :1])  # warm-up
    session.crop(context_length)
    seconds = []
    for n in range(1, max_tokens + 1):
        samples = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            session.forward(block[:, :n])
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
            session.crop(context_length)
        seconds.append(statistics.median(samples))
    session.reset()
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

    def observe_draft(self, seconds: float) -> None:
        """Fold one round's measured drafting time into D."""
        if self.draft_seconds is None:
            self.draft_seconds = seconds
        else:
            self.draft_seconds += self.DRAFT_TIME_WEIGHT * (seconds - self.draft_seconds)

    def round_seconds(self, num_tokens: int) -> float:
        """D + V(n): a round that verifies `num_tokens` tokens (the anchor included)."""
        return (self.draft_seconds or 0.0) + 1.0 / self.profile.steps_per_second(num_tokens)

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
    """Sequential temperature scaling (SPEC §4): left to right, the temperature of position j minimises the ECE of
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
