"""How tokens are chosen (`SamplingParams`), checked without torch so that a command refuses an out-of-range
--temperature / --top-p / --top-k before torch loads. The rules that use it live in `spectool.decoding.accept`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from spectool.errors import UsageError

#: The lowest temperature above greedy: lower ones overflow logits / T (use 0 for greedy).
MIN_TEMPERATURE = 1e-3


class SamplingError(UsageError, ValueError):
    """Out-of-range sampling settings: bad usage (exit 2) on the command line, a ValueError to Python callers."""


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen. temperature 0 means greedy; top_k 0 and top_p 1.0 mean no truncation."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        t = self.temperature
        if not (t == 0 or (math.isfinite(t) and t >= MIN_TEMPERATURE)):
            raise SamplingError(f"--temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, got {t}")
        if not 0 < self.top_p <= 1:  # NaN fails this too
            raise SamplingError(f"--top-p must be in (0, 1] (1 = no nucleus cut), got {self.top_p}")
        if self.top_k < 0:
            raise SamplingError(f"--top-k must be >= 0 (0 = no cut), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


__all__ = ["MIN_TEMPERATURE", "SamplingError", "SamplingParams"]
