"""Rendering helpers shared by the commands: consoles, one-line errors, depth bars, number formats, and the panels
that describe a target and a method's draft for it (`spectool inspect`, the demo)."""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console, Group
from rich.panel import Panel
from rich.progress import TextColumn
from rich.table import Column, Table
from rich.text import Text

from spectool.errors import SpectoolError
from spectool.registry import get

if TYPE_CHECKING:
    from spectool.hub import TargetInfo
    from spectool.inspection import MethodReport

F = TypeVar("F", bound=Callable[..., Any])


def console() -> Console:
    """Standard output console; Rich honours NO_COLOR and drops styling when stdout is not a terminal. Prose wraps
    between words on a terminal and stays one line per message in a pipe or a log (`prose_wrapping`)."""
    return prose_wrapping(Console(highlight=False))


def error_console() -> Console:
    return prose_wrapping(Console(stderr=True, highlight=False))


def prose_wrapping(out: Console) -> Console:
    """Wrap printed text at the terminal's width between words (a terminal breaks a long line mid-word), but
    write one line per message where the output is not a terminal (grep-able logs, test captures)."""
    out.soft_wrap = not out.is_terminal
    return out


def handles_errors(command: F) -> F:
    """Turn a SpectoolError into one line on stderr and its exit code; any other exception into one line too.

    Set SPECTOOL_DEBUG=1 to see the traceback of an unexpected error.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SpectoolError as exc:
            error_console().print(Text(f"error: {exc}", style="bold red"))
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:  # a bug: still one line, the traceback on request
            if os.environ.get("SPECTOOL_DEBUG"):
                traceback.print_exc()
            message = f"internal error: {type(exc).__name__}: {exc} (set SPECTOOL_DEBUG=1 for the traceback)"
            error_console().print(Text(message, style="bold red"))
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def print_runtime_messages(runtime: Any) -> None:
    """A loaded runtime's warnings (yellow) and notes (dim) on stderr, one line each."""
    for warning in runtime.warnings:
        error_console().print(Text(f"warning: {warning}", style="yellow"))
    for note in runtime.notes:
        error_console().print(Text(f"note: {note}", style="dim"))


def print_json(data: Any) -> None:
    """One JSON object on stdout, nothing else (for scripts)."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def human_count(n: int | None) -> str:
    """12_345_678 -> '12.35M'."""
    if n is None:
        return "?"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def depth_bar(num_layers: int, ids: Sequence[int], style: str = "bold cyan") -> Text:
    """The target's depth as one cell per layer output, selected ids filled: `E▕░█░░█…▏`.

    The leading `E` cell is the embedding output (id -1); cell i is the output of decoder layer i, and the
    last cell (id N-1) is the post-norm last hidden state.
    """
    chosen = set(ids)
    bar = Text()
    bar.append("E", style=style if -1 in chosen else "dim")
    bar.append("▕", style="dim")
    for i in range(num_layers):
        bar.append("█" if i in chosen else "░", style=style if i in chosen else "dim")
    bar.append("▏", style="dim")
    return bar


def shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


ROLE_STYLE = {"trainable": "green", "frozen": "yellow", "buffer": "magenta", "borrowed": "dim"}
ROLE_TEXT = {
    "trainable": "trainable",
    "frozen": "frozen copy",
    "buffer": "buffer",
    "borrowed": "target's (not stored)",
}


def target_panel(info: TargetInfo) -> Panel:
    """The target's architecture facts (`spectool inspect`, the demo)."""
    a = info.arch
    total, active = a.parameter_counts()
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("architectures", ", ".join(a.architectures) or "(none)")
    table.add_row("model_type", a.model_type)
    table.add_row("layers", str(a.num_hidden_layers))
    table.add_row("hidden size", str(a.hidden_size))
    head_dim_note = "" if a.head_dim_explicit else " (hidden / heads)"
    table.add_row(
        "attention",
        f"{a.num_attention_heads} heads, {a.num_key_value_heads} kv heads, head_dim {a.head_dim}{head_dim_note}",
    )
    if a.is_moe:
        table.add_row(
            "feed-forward",
            f"MoE: {a.num_experts} experts, top-{a.num_experts_per_tok}, "
            f"expert size {a.moe_intermediate_size or a.intermediate_size}",
        )
    else:
        table.add_row("feed-forward", f"dense, intermediate {a.intermediate_size or '?'}")
    vocab = f"{a.vocab_size}"
    if info.tokenizer_length is not None:
        vocab += f"  (tokenizer length {info.tokenizer_length}, from {info.tokenizer_length_source})"
    table.add_row("vocab", vocab)
    rope = f"{a.rope_type}, theta {a.rope_theta:,.0f}" if a.rope_theta is not None else a.rope_type
    if a.rope_scaling and a.rope_scaling.get("factor"):
        rope += f", factor {a.rope_scaling['factor']:g}"
    table.add_row("rope", rope)
    if a.max_position_embeddings:
        table.add_row("max positions", str(a.max_position_embeddings))
    table.add_row("tied embeddings", "yes" if a.tie_word_embeddings else "no")
    params = f"{human_count(total)} (estimated from the config)"
    if a.is_moe:
        params = f"{human_count(total)} total, {human_count(active)} active per token (estimated from the config)"
    table.add_row("parameters", params)
    source = {"local": "local files", "hub": "the Hub", "cache": "the local Hub cache", "catalog": "built-in catalog"}
    where = source[info.source]
    if info.embedded:
        where = "embedded in spectool"
    if info.gguf is not None:
        where = "GGUF file"
        table.add_row("weights", info.gguf.describe())
        table.add_row("cached at", str(info.directory))
    title = f"[bold]{info.ref}[/]  [dim]({where})[/]"
    return Panel(table, title=title, title_align="left")


def method_panel(info: TargetInfo, report: MethodReport) -> Panel:
    """One method's draft for the target: support, feature layers, shape, parameters and its tensors."""
    title = f"[bold]{report.title}[/]"
    if not report.supported:
        return Panel(Text(f"not supported: {report.reason}", style="red"), title=title, title_align="left")
    spec, layout = report.spec, report.layout
    assert spec is not None and layout is not None
    n = info.arch.num_hidden_layers
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("draft class", f"{spec.draft_class}  [dim](matched {spec.architecture})[/]")
    bar = depth_bar(n, spec.target_layer_ids)
    bar.append(f"  ids {list(spec.target_layer_ids)} of 0..{n - 1}")
    facts.add_row("feature layers", bar)
    shape = f"{spec.num_draft_layers} decoder layer{'s' if spec.num_draft_layers != 1 else ''}"
    for phrase in get(spec.method).shape_phrases(spec, info.arch):
        shape += f", {phrase}"
    facts.add_row("draft", shape)
    facts.add_row(
        "parameters",
        f"{human_count(layout.trainable_params)} trainable, {human_count(layout.frozen_params)} frozen copies; "
        f"checkpoint {human_bytes(layout.stored_bytes_bf16)} in bf16",
    )
    facts.add_row("init writes", spec.checkpoint_format)
    for note in report.notes:
        facts.add_row("note", Text(note, style="yellow"))

    # Names stay whole on one line (a name folded mid-word read as another row at 80 columns): ".weight" is
    # left out (the header says so) and the role column is the one that wraps, between words.
    modules = Table(box=None, padding=(0, 1), show_edge=False, header_style="dim")
    modules.add_column("tensor (.weight)", no_wrap=True)
    modules.add_column("shape", no_wrap=True)
    modules.add_column("params", justify="right", no_wrap=True)
    modules.add_column("role", min_width=8)
    for t in collapse_layers(layout.tensors):
        name = t[0].removesuffix(".weight")
        role = Text(ROLE_TEXT[t[3]] if t[3] in ROLE_TEXT else t[3], ROLE_STYLE.get(t[3]))
        modules.add_row(name, t[1], human_count(t[2]), role)
    return Panel(Group(facts, Text(""), modules), title=title, title_align="left")


def collapse_layers(tensors) -> list[tuple[str, str, int, str]]:
    """Show `layers.{i}.*` once as `layers.[0-L).*` with the count summed over layers."""
    rows: dict[str, list] = {}
    depth = 1 + max((int(t.name.split(".")[1]) for t in tensors if t.name.startswith("layers.")), default=-1)
    for t in tensors:
        name = t.name
        if name.startswith("layers."):
            parts = name.split(".")
            name = ".".join(["layers.*" if depth > 1 else f"layers.{parts[1]}", *parts[2:]])
        row = rows.setdefault(name, [name, shape_text(t.shape), 0, t.role])
        row[2] += t.numel
    if depth > 1:
        for row in rows.values():
            if row[0].startswith("layers.*"):
                row[1] += f" x{depth}"
    return [tuple(r) for r in rows.values()]


def stats_column(out: Console, reserved: int = 52) -> TextColumn:
    """A progress bar's column of running figures (`task.fields[stats]`), cut with an ellipsis so the step count,
    the elapsed time and the eta, which take about `reserved` columns, always stay on the line."""
    return TextColumn(
        "{task.fields[stats]}",
        table_column=Column(no_wrap=True, overflow="ellipsis", max_width=max(10, out.width - reserved)),
    )
