"""Stop strings: end an answer once its text contains one of them (as `generate(stop_strings=...)` does).

Speculative rounds commit several tokens at once, so the check runs token by token over each round's new tokens:
the answer ends at the first token whose text completes a stop string, and keeps that token. Only a window of
recent tokens is decoded per check, so the cost does not grow with the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from spectool.errors import UsageError

#: Tokens decoded past the longest stop string: byte-level pieces of one character, and special tokens that
#: decode to nothing, still leave the window long enough.
_SLACK_TOKENS = 16


class StopStrings:
    """``completes_at(ids)``: whether the last token of ``ids`` completes one of ``strings``."""

    def __init__(self, decode: Callable[[list[int]], str], strings: Sequence[str]) -> None:
        if not strings:
            raise UsageError("no stop strings given")
        if any(not s for s in strings):
            raise UsageError("a stop string may not be empty")
        self.decode = decode
        self.strings = tuple(strings)
        self.window = max(len(s) for s in self.strings) + _SLACK_TOKENS

    def completes_at(self, ids: Sequence[int], end: int | None = None) -> bool:
        """True when ``decode(ids[:end])`` contains a stop string that ``decode(ids[:end - 1])`` does not (over the
        window; ``end`` defaults to ``len(ids)``, and only the window is copied)."""
        end = len(ids) if end is None else end
        if end <= 0:
            return False
        recent = list(ids[max(0, end - self.window - 1) : end])
        text = self.decode(recent)
        if not any(s in text for s in self.strings):
            return False
        before = self.decode(recent[:-1])
        return any(s in text and s not in before for s in self.strings)

    def found_in(self, ids: Sequence[int]) -> bool:
        """Whether the whole text of ``ids`` contains a stop string (for loops that add several tokens at once
        and cannot cut a step short, such as HF's prompt lookup)."""
        text = self.decode(list(ids))
        return any(s in text for s in self.strings)
