"""A speculative chat session and how it shows an answer: accepted draft tokens highlighted inline, one colour
per round, and one stats line per answer (`spectool chat`, the demo)."""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

from spectool.cli.render import error_console

if TYPE_CHECKING:
    from spectool.decoding.accept import SamplingParams
    from spectool.decoding.engine import GenerationStats, RoundEvent
    from spectool.decoding.stops import StopStrings

ROUND_STYLES = ("black on green3", "black on dark_sea_green2")  # alternate per round so each block stands out


class AnswerPrinter:
    """Streams an answer token by token: accepted draft tokens highlighted per round, the target's own plain.

    Byte-level tokenizers can split one character over several tokens; text is printed only once it decodes
    to complete characters, and each piece takes the style of the token that completed it. On a terminal the
    answer wraps between words at its width (a terminal folds a long line mid-word); elsewhere it is written as
    it comes.
    """

    def __init__(self, tokenizer, out: Console) -> None:
        self.tokenizer = tokenizer
        self.out = out
        self.ids: list[int] = []
        self.shown = ""
        self.column = 0  # where the cursor is on the terminal's line

    def _wrapped(self, piece: str) -> str:
        """`piece` with a line break before each word that would cross the terminal's right edge."""
        if not self.out.is_terminal:
            return piece
        out = []
        for part in piece.split(" ") if "\n" not in piece else [piece]:
            if "\n" in part:
                out.append(part)
                self.column = len(part) - part.rfind("\n") - 1
                continue
            if out:  # the space between this part and the last
                # 3 columns spare: a word's next token may carry on without a space
                if self.column + 1 + len(part) > self.out.width - 3 and self.column:
                    out.append("\n")
                    self.column = 0
                else:
                    out.append(" ")
                    self.column += 1
            out.append(part)
            self.column += len(part)
        return "".join(out)

    def add(self, event: RoundEvent, round_index: int) -> None:
        for i, token in enumerate(event.tokens):
            self.ids.append(token)
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            if text.endswith("\ufffd") or not text.startswith(self.shown):
                continue
            piece, self.shown = text[len(self.shown) :], text
            drafted = i < event.num_accepted and event.kind != "prefill"
            style = ROUND_STYLES[round_index % 2] if drafted else ""
            self.out.print(Text(self._wrapped(piece), style=style), end="", soft_wrap=True, highlight=False)


class ChatSession:
    """One conversation with the target through a draft: fits each message into the target's positions (dropping
    the oldest turns, saying so), streams the answer with the accepted draft tokens highlighted, and keeps the
    rounds for `/stats`. `spectool chat` and the demo answer through it."""

    def __init__(
        self,
        runtime,
        *,
        system: str | None,
        sampling: SamplingParams,
        max_new_tokens: int,
        out: Console,
        stop_strings: StopStrings | None = None,
        max_drafts: int | None = None,
        target_step: float | None = None,
    ):
        """`target_step`: seconds of one plain target step (`target_step_seconds`), for the stats line."""
        self.runtime = runtime
        self.target_step = target_step
        self.stop_strings = stop_strings
        self.max_drafts = max_drafts
        self.system = system
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.out = out
        self.messages: list[dict[str, str]] = []
        self.session_rounds: list[RoundEvent] = []
        self.turns = 0

    def reset(self) -> None:
        self.messages = []

    def fit(self, user_text: str) -> tuple[list[int], int]:
        """The prompt ids of this turn and the answer's token budget, within the target's positions
        (`Runtime.fit_conversation`): the oldest turns dropped, or the answer capped, saying so."""
        fitted = self.runtime.fit_conversation(self.system, self.messages, user_text, self.max_new_tokens)
        self.messages = fitted.history
        if fitted.dropped_turns:
            self.note(
                f"dropped the oldest {_turns(fitted.dropped_turns)} of the conversation to fit the target's "
                f"{fitted.limit} positions (max_position_embeddings); {_turns(len(fitted.history) // 2)} kept"
            )
        if fitted.max_new_tokens < self.max_new_tokens:
            self.note(
                f"answer capped at {fitted.max_new_tokens} tokens (not {self.max_new_tokens}): the prompt is "
                f"{len(fitted.ids)} tokens and the target takes at most {fitted.limit} positions "
                "(max_position_embeddings)"
            )
        return fitted.ids, fitted.max_new_tokens

    def note(self, text: str) -> None:
        error_console().print(Text(f"note: {text}", style="yellow"))

    def answer(self, user_text: str) -> None:
        from spectool.decoding.engine import GenerationStats

        runtime = self.runtime
        ids, max_new_tokens = self.fit(user_text)
        printer = AnswerPrinter(runtime.tokenizer, self.out)
        rounds: list[RoundEvent] = []
        start = time.perf_counter()
        stopped = False
        try:
            for index, event in enumerate(
                runtime.engine.generate(
                    ids,
                    max_new_tokens=max_new_tokens,
                    sampling=self.sampling,
                    stop_token_ids=runtime.stop_token_ids,
                    stop_strings=self.stop_strings,
                    max_drafts=self.max_drafts,
                    seed=self.turns,
                )
            ):
                rounds.append(event)
                printer.add(event, index)
        except KeyboardInterrupt:
            stopped = True
        stats = GenerationStats(rounds, time.perf_counter() - start)
        finish = rounds[-1].finish_reason if rounds else None
        self.turns += 1
        self.session_rounds += rounds
        self.messages += [
            {"role": "user", "content": user_text},
            {"role": "assistant", "content": runtime.decode(printer.ids)},
        ]
        self.out.print()
        if stopped:
            self.out.print(Text("[answer stopped by Ctrl-C]", style="yellow"))
        elif finish == "length":
            self.out.print(Text(f"[answer cut at {max_new_tokens} tokens: raise --max-new-tokens]", style="yellow"))
        auto = runtime.engine.controller is not None
        line = stats_line(stats, auto=auto, cap=self.max_drafts, target_step=self.target_step)
        self.out.print(Text(line, style="dim"))

    def histogram(self) -> str:
        from spectool.decoding.engine import GenerationStats

        rounds = GenerationStats(self.session_rounds).verify_rounds
        if not rounds:
            return "no answers yet"
        counts = Counter(len(r.tokens) for r in rounds)
        width = max(counts.values())
        lines = [f"tokens per target forward over {len(rounds)} rounds (bonus/correction included):"]
        for k in sorted(counts):
            lines.append(f"  {k:>2} {'█' * max(1, round(30 * counts[k] / width))} {counts[k]}")
        return "\n".join(lines)


def _turns(count: int) -> str:
    return f"{count} turn{'' if count == 1 else 's'}"


def target_step_seconds(runtime) -> float:
    """One plain target step after a short context, timed (the median of a few; under a second)."""
    from spectool.decoding.draft_length import profile_verify_cost

    return profile_verify_cost(runtime.target_engine.session, 1, budget_seconds=0.5, repeats=5).seconds[0]


def stats_line(
    stats: GenerationStats, *, auto: bool = False, cap: int | None = None, target_step: float | None = None
) -> str:
    """One line after each answer: acceptance, per-position counts, how many tokens each round drafted and why
    (``auto``: `--verify auto` chose; ``cap``: `--max-drafts`), and the speed; drafting every round (not
    ``auto``), the target alone's speed from `target_step` seconds, and in plain words why little is highlighted
    when the target rejected most drafted tokens."""
    accepted, drafted = stats.accepted_per_position()
    per_position = " ".join(f"{a}/{d}" for a, d in zip(accepted, drafted, strict=True)) or "-"
    tau = f"{stats.acceptance_length:.2f}" if stats.verify_rounds else "n/a"
    drafted_counts = Counter(r.num_drafted for r in stats.verify_rounds)
    drafted_per_round = ""
    if auto or cap is not None or len(drafted_counts) > 1:
        why = []
        if auto:
            plain = drafted_counts.get(0, 0)
            rounds = sum(drafted_counts.values())
            why.append(
                "--verify auto drafted only where it paid; mostly plain target steps: on this machine drafting "
                "costs more than it returns (`spectool bench --profile` shows the costs)"
                if rounds and plain / rounds > 0.5
                else "--verify auto chose each round's length from the measured costs and acceptance"
            )
        if cap is not None:
            why.append(f"at most {cap} by --max-drafts")
        histogram = " ".join(f"{k}:{v}" for k, v in sorted(drafted_counts.items())) or "-"
        drafted_per_round = (
            f"drafted per round {histogram} (0: a plain target step; {'; '.join(why) or 'the answer ended'}) · "
        )
    speed = f"{stats.new_tokens} tokens in {stats.seconds:.2f}s ({stats.tokens_per_second:.1f} tok/s)"
    if not auto and target_step:
        speed += (
            f" · drafting every round; the target alone: ~{1 / target_step:.1f} tok/s here "
            "(--verify auto drafts only where it pays)"
        )
        if stats.verify_rounds and sum(accepted) < 0.2 * max(1, stats.new_tokens):
            speed += " · little is highlighted: the target rejected most of the draft's tokens"
    return (
        f"acceptance length {tau} tokens/forward (incl. bonus) · "
        f"accepted/drafted by position {per_position} · {drafted_per_round}{speed}"
    )
