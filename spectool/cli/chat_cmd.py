"""`spectool chat`: multi-turn speculative chat that shows, inline, which tokens the draft got accepted."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.text import Text

from spectool.cli import app
from spectool.cli.render import console, error_console, handles_errors
from spectool.errors import UsageError
from spectool.paths import resolve_draft_dir, user_data_dir

if TYPE_CHECKING:
    from spectool.decoding.accept import SamplingParams
    from spectool.decoding.engine import GenerationStats, RoundEvent
    from spectool.decoding.stops import StopStrings

ROUND_STYLES = ("black on green3", "black on dark_sea_green2")  # alternate per round so each block stands out
HELP = """commands:
  /help          this help
  /stats         acceptance histogram of this session
  /reset         forget the conversation
  /system TEXT   set the system prompt (and reset)
  /temp T        set the temperature (0 = greedy)
  /quit          leave (Ctrl-D too); Ctrl-C stops the current answer
keys (in a terminal): arrows and Emacs keys edit the line, Up/Down walk the history (kept across sessions in
{history}), Ctrl-R searches it, Alt-Enter (or Esc then Enter) starts a new line within one message."""
HISTORY_FILE = "chat_history"


class AnswerPrinter:
    """Streams an answer token by token: accepted draft tokens highlighted per round, the target's own plain.

    Byte-level tokenizers can split one character over several tokens; text is printed only once it decodes
    to complete characters, and each piece takes the style of the token that completed it.
    """

    def __init__(self, tokenizer, out: Console) -> None:
        self.tokenizer = tokenizer
        self.out = out
        self.ids: list[int] = []
        self.shown = ""

    def add(self, event: RoundEvent, round_index: int) -> None:
        for i, token in enumerate(event.tokens):
            self.ids.append(token)
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            if text.endswith("\ufffd") or not text.startswith(self.shown):
                continue
            piece, self.shown = text[len(self.shown) :], text
            drafted = i < event.num_accepted and event.kind != "prefill"
            style = ROUND_STYLES[round_index % 2] if drafted else ""
            self.out.print(Text(piece, style=style), end="", soft_wrap=True, highlight=False)


class ChatSession:
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
    ):
        self.runtime = runtime
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

    def conversation(self, user_text: str, history: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
        """The system prompt, the history (this session's unless given) and the user's new message."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        history = self.messages if history is None else history
        return head + history + [{"role": "user", "content": user_text}]

    @property
    def max_positions(self) -> int | None:
        """The target's max_position_embeddings: prompt + answer must fit in it (None when the config has none)."""
        limit = self.runtime.info.arch.max_position_embeddings
        return limit if isinstance(limit, int) and limit > 0 else None

    def fit(self, user_text: str) -> tuple[list[int], int]:
        """The prompt ids of this turn and the answer's token budget, within the target's positions.

        A message that leaves no room for an answer even without the history is refused (UsageError) and the
        history kept. Otherwise the oldest turns are dropped, saying so, until a full answer fits; when the
        message alone leaves room for fewer than max_new_tokens, the history goes and the answer is capped, saying
        so."""
        ids = self.runtime.prompt_ids(self.conversation(user_text))
        limit = self.max_positions
        if limit is None or len(ids) + self.max_new_tokens <= limit:
            return ids, self.max_new_tokens
        alone = len(self.runtime.prompt_ids(self.conversation(user_text, history=[])))
        if alone >= limit:
            system = " and the system prompt" if self.system else ""
            raise UsageError(
                f"the prompt is {alone} tokens with the chat template{system}, which leaves no room for an answer in "
                f"the target's {limit} positions (max_position_embeddings); shorten it"
            )
        budget = min(self.max_new_tokens, limit - alone)
        dropped = 0
        while len(ids) + budget > limit and self.messages:
            self.messages = self.messages[2:]  # one turn: the user's message and its answer
            dropped += 1
            ids = self.runtime.prompt_ids(self.conversation(user_text))
        if dropped:
            self.note(
                f"dropped the oldest {_turns(dropped)} of the conversation to fit the target's {limit} positions "
                f"(max_position_embeddings); {_turns(len(self.messages) // 2)} kept"
            )
        if budget < self.max_new_tokens:
            self.note(
                f"answer capped at {budget} tokens (not {self.max_new_tokens}): the prompt is {len(ids)} tokens "
                f"and the target takes at most {limit} positions (max_position_embeddings)"
            )
        return ids, budget

    def note(self, text: str) -> None:
        error_console().print(Text(f"note: {text}", style="yellow"), soft_wrap=True)

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
        line = stats_line(stats, auto=runtime.engine.controller is not None, cap=self.max_drafts)
        self.out.print(Text(line, style="dim"), soft_wrap=True)

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


def utf8_problem(text: str) -> str | None:
    """Why `text` is not valid UTF-8, or None. Undecodable bytes reach Python as lone surrogates (argv and, once
    `read_lines_leniently` ran, stdin decode them with surrogateescape); the tokenizer cannot take them."""
    for position, char in enumerate(text):
        if "\ud800" <= char <= "\udfff":
            code = ord(char)
            what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
            return f"{what} at character {position + 1}"
    return None


def check_utf8(text: str | None, option: str) -> None:
    """Refuse an option's text that is not valid UTF-8 (exit 2)."""
    problem = utf8_problem(text) if text is not None else None
    if problem:
        raise UsageError(f"{option} is not valid UTF-8 ({problem}); pass the text encoded as UTF-8")


def read_lines_leniently() -> None:
    """Let `input()` return a line that is not valid UTF-8 (as surrogate escapes, which `utf8_problem` finds)
    instead of raising and losing the rest of the buffered input."""
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")


def stats_line(stats: GenerationStats, *, auto: bool = False, cap: int | None = None) -> str:
    """One line after each answer: acceptance, per-position counts, how many tokens each round drafted and why
    (``auto``: `--verify auto` chose; ``cap``: `--max-drafts`), and the speed."""
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
    return (
        f"acceptance length {tau} tokens/forward (incl. bonus) · "
        f"accepted/drafted by position {per_position} · {drafted_per_round}"
        f"{stats.new_tokens} tokens in {stats.seconds:.2f}s ({stats.tokens_per_second:.1f} tok/s)"
    )


def line_reader(interactive: bool, history: Path | None) -> Callable[[str], str]:
    """How chat reads a message: in a terminal, prompt_toolkit (line editing, history kept in ``history`` across
    sessions, Ctrl-R search, Alt-Enter for a new line within a message); otherwise plain ``input()`` (pipes,
    scripts), which reads undecodable bytes leniently so they can be reported."""
    if not interactive:
        read_lines_leniently()
        return input
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _(event) -> None:  # Alt-Enter / Esc Enter: a new line inside the message
        event.current_buffer.insert_text("\n")

    stored = InMemoryHistory()
    if history is not None:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            stored = FileHistory(str(history))
        except OSError:
            pass  # an unwritable data directory: history for this session only
    session = PromptSession(history=stored, key_bindings=bindings, enable_history_search=False)
    return session.prompt


@app.command("chat")
@handles_errors
def chat_command(
    draft: str = typer.Option(
        "dspark",
        "--draft",
        "-d",
        help="Draft checkpoint directory, or the name of a draft shipped with spectool for its embedded tiny target "
        "(dspark, dflash, eagle3) \\[dspark].",
    ),
    target: str = typer.Option(None, "--target", "-t", help="Target MODEL (default: the one the draft records)."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n"),
    system: str = typer.Option(None, "--system", help="System prompt."),
    prompt: str = typer.Option(None, "--prompt", help="Answer this one prompt and exit (scriptable)."),
    plain: bool = typer.Option(False, "--plain", help="No colours or styles (also when stdout is not a terminal)."),
    tree: str = typer.Option(None, "--tree", help="EAGLE-2 dynamic tree TOP_K,DEPTH,TOTAL (EAGLE drafts)."),
    verify: str = typer.Option(
        "auto",
        "--verify",
        help="auto: choose each round how many tokens to draft (0, a plain target step, when drafting does not pay "
        "on this machine); full: draft all the draft offers every round.",
    ),
    stop: list[str] = typer.Option(None, "--stop", help="End answers at this text (repeatable); eos always ends."),
    max_drafts: int = typer.Option(None, "--max-drafts", help="Draft at most N tokens per round \\[the whole block]."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... \\[cuda when available, in bf16]."),
) -> None:
    """Chat with the target through the draft: accepted draft tokens are highlighted inline, one colour per round;
    the target's own tokens (corrections and bonus tokens) are plain. The output is exactly the target's."""
    resolve_draft_dir(draft)  # before torch loads: a wrong path answers at once
    from spectool.decoding.accept import SamplingParams
    from spectool.decoding.stops import StopStrings
    from spectool.runtime import load_runtime

    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if max_drafts is not None and max_drafts < 1:
        raise UsageError(f"--max-drafts must be at least 1, got {max_drafts}")
    check_utf8(prompt, "--prompt")
    check_utf8(system, "--system")
    for text in stop or []:
        check_utf8(text, "--stop")
    if prompt is not None and not prompt.strip():
        raise UsageError("--prompt is empty: give the text to answer, or leave --prompt out to chat interactively")
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)  # a UsageError when out of range
    out = Console(color_system=None, highlight=False) if plain else console()
    runtime = load_runtime(draft, target, device=device, verify=verify, tree=tree)
    for warning in runtime.warnings:
        error_console().print(Text(f"warning: {warning}", style="yellow"), soft_wrap=True)
    stop_strings = StopStrings(runtime.tokenizer.decode, stop) if stop else None
    session = ChatSession(
        runtime,
        system=system,
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        out=out,
        stop_strings=stop_strings,
        max_drafts=max_drafts,
    )
    if prompt is not None:
        session.answer(prompt)
        return
    out.print(legend_text(runtime.draft.method, runtime.info.ref), soft_wrap=True)
    history = user_data_dir() / HISTORY_FILE
    read_line = line_reader(sys.stdin.isatty() and sys.stdout.isatty(), history)
    while True:
        try:
            line = read_line("you> ")
        except EOFError:
            out.print()
            return
        except KeyboardInterrupt:
            out.print()
            continue
        except UnicodeDecodeError as exc:  # a stdin that cannot decode leniently (see read_lines_leniently)
            session.note(f"skipped a line that is not valid UTF-8 ({exc.reason}); type it again in UTF-8")
            continue
        problem = utf8_problem(line)
        if problem:
            session.note(f"skipped a line that is not valid UTF-8 ({problem}); type it again in UTF-8")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if not _command(session, text, out):
                return
            continue
        try:
            session.answer(text)
        except UsageError as exc:  # this message alone does not fit the target: the session goes on
            error_console().print(Text(f"error: {exc}", style="bold red"), soft_wrap=True)


def legend_text(method: str, target: str) -> Text:
    """What the colours mean, in plain words."""
    legend = Text(f"{method} draft on {target}. ")
    legend.append("Highlighted", style=ROUND_STYLES[0])
    legend.append(": tokens the draft proposed and the target accepted; the colour changes ")
    legend.append("with each round", style=ROUND_STYLES[1])
    legend.append(" (one target forward). Plain: tokens the target produced itself. The text is exactly the ")
    legend.append("target's own. /help for commands and keys.")
    return legend


def _command(session: ChatSession, text: str, out: Console) -> bool:
    """Run a slash command; False means leave."""
    name, _, arg = text.partition(" ")
    if name in ("/quit", "/exit"):
        return False
    if name == "/help":
        out.print(HELP.format(history=user_data_dir() / HISTORY_FILE), markup=False)
    elif name == "/stats":
        out.print(session.histogram())
    elif name == "/reset":
        session.reset()
        out.print("conversation forgotten")
    elif name == "/system":
        session.system = arg.strip() or None
        session.reset()
        out.print(f"system prompt {'set' if session.system else 'cleared'}; conversation forgotten")
    elif name == "/temp":
        from spectool.decoding.accept import MIN_TEMPERATURE, SamplingParams

        try:
            value = float(arg)
            session.sampling = SamplingParams(value, session.sampling.top_p, session.sampling.top_k)
            out.print(f"temperature {value:g}")
        except ValueError:
            out.print(f"usage: /temp T  (0 for greedy, or a number >= {MIN_TEMPERATURE:g})")
    else:
        out.print(f"unknown command {name}; /help lists them")
    return True
