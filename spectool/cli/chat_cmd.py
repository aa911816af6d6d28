"""`spectool chat`: multi-turn speculative chat that shows, inline, which tokens the draft got accepted."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from spectool.cli.application import app
from spectool.cli.chat_session import ROUND_STYLES, ChatSession, target_step_seconds
from spectool.cli.help import device_map_option, draft_option
from spectool.cli.render import console, error_console, handles_errors, print_runtime_messages, prose_wrapping
from spectool.errors import UsageError
from spectool.hub import check_device_map
from spectool.paths import resolve_draft_dir, user_data_dir

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
    draft: str = draft_option(),
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
        "full",
        "--verify",
        help="full: draft all the draft offers every round, so its accepted tokens show (the stats line gives the "
        "target alone's speed beside it); auto: choose each round how many tokens to draft (0, a plain target "
        "step, where drafting does not pay on this machine), the fastest.",
    ),
    stop: list[str] = typer.Option(None, "--stop", help="End answers at this text (repeatable); eos always ends."),
    max_drafts: int = typer.Option(None, "--max-drafts", help="Draft at most N tokens per round \\[the whole block]."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... \\[cuda when available, in bf16]."),
    device_map: str = device_map_option(),
) -> None:
    """Chat with the target through the draft: accepted draft tokens are highlighted inline, one colour per round;
    the target's own tokens (corrections and bonus tokens) are plain. The output is exactly the target's."""
    resolve_draft_dir(draft)  # before torch loads: a wrong path answers at once
    check_device_map(device_map, device)
    from spectool.sampling import SamplingParams  # torch-free: out-of-range settings answer before torch loads

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
    from spectool.decoding.stops import StopStrings
    from spectool.runtime import load_runtime

    out = prose_wrapping(Console(color_system=None, highlight=False)) if plain else console()
    runtime = load_runtime(draft, target, device=device, verify=verify, tree=tree, device_map=device_map)
    # Drafting every round shows the draft at work but may be slower than the target alone: time a plain step
    # once so each stats line can say so (under a second).
    target_step = target_step_seconds(runtime) if runtime.engine.controller is None else None
    print_runtime_messages(runtime)
    stop_strings = StopStrings(runtime.tokenizer.decode, stop) if stop else None
    session = ChatSession(
        runtime,
        system=system,
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        out=out,
        stop_strings=stop_strings,
        max_drafts=max_drafts,
        target_step=target_step,
    )
    if prompt is not None:
        session.answer(prompt)
        return
    out.print(legend_text(runtime.draft.method, runtime.info.ref))
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
            error_console().print(Text(f"error: {exc}", style="bold red"))


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
