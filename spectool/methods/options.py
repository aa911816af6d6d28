"""A method's own options, declared with the method: `MethodOption`.

A method lists its options in `DraftMethod.options` (DSpark's Markov rank, EAGLE-3's draft vocabulary, the block
methods' block size ...). Everything else is built from those declarations: the `init` / `train` / `inspect`
command-line options, the method part of `TrainConfig` (and of train_config.json and config files), the
`DraftSpec` a draft resolves to, the set `--resume` may not change, and the rows `inspect` shows. So no module
outside a method's own names a method's option.

An option either shapes the draft (``part="shape"``: resolved against the target into `DraftSpec.options`, written
into the draft's config.json) or tunes the training objective (``part="objective"``: passed to the objective's
constructor). Several methods may declare the same option (the block methods share theirs); a name means one
thing wherever it is declared (its help may give each method's own default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from spectool.errors import UsageError


@dataclass(frozen=True)
class MethodOption:
    """One option of a method: its name (the config key, snake_case; on the command line the same words joined by
    dashes after ``--``), type, help line (the default in brackets), which part of the method it sets, and its
    accepted range."""

    name: str
    kind: type  # int or float
    help: str
    part: Literal["shape", "objective"]
    minimum: float | None = None  # the smallest value accepted (None: any)
    exclusive: bool = False  # the minimum itself is refused (a positive float)
    maximum: float | None = None
    range_note: str = ""  # said after the range in the error (e.g. the published values)
    resumable: bool = False  # whether a resumed run may change it (most change what the saved state means)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> None:
        """A usage error naming the flag for a value out of range (None: not given, accepted)."""
        if value is None:
            return
        low, high = self.minimum, self.maximum
        too_low = low is not None and (value <= low if self.exclusive else value < low)
        if not too_low and (high is None or value <= high):
            return
        note = f" ({self.range_note})" if self.range_note else ""
        if high is not None and low is not None:
            wanted = f"between {low:g} and {high:g}"
        elif high is not None:
            wanted = f"at most {high:g}"
        elif self.exclusive and low == 0:
            wanted = "positive"
        else:
            wanted = f"{'above' if self.exclusive else 'at least'} {low:g}"
        raise UsageError(f"{self.flag} must be {wanted}{note}, got {value}")


def merged(declared: list[MethodOption]) -> dict[str, MethodOption]:
    """Options by name, each once. Methods that share an option may word its help differently (their defaults
    differ), but its type, part and range must agree: two different options under one name are a programming error."""
    found: dict[str, MethodOption] = {}
    for option in declared:
        first = found.setdefault(option.name, option)
        if (first.kind, first.part, first.minimum, first.exclusive, first.maximum, first.resumable) != (
            option.kind,
            option.part,
            option.minimum,
            option.exclusive,
            option.maximum,
            option.resumable,
        ):
            raise ValueError(f"two different options are declared as {option.name!r}: {first} / {option}")
    return found


__all__ = ["MethodOption", "merged"]
