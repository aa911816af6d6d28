"""Rendering helpers shared by the commands: consoles, one-line errors, depth bars, number formats."""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from spectool.errors import SpectoolError

F = TypeVar("F", bound=Callable[..., Any])


def console() -> Console:
    """Standard output console; Rich honours NO_COLOR and drops styling when stdout is not a terminal."""
    return Console(highlight=False)


def error_console() -> Console:
    return Console(stderr=True, highlight=False)


def handles_errors(command: F) -> F:
    """Turn a SpectoolError into one line on stderr and its exit code; any other exception into one line too.

    Set SPECTOOL_DEBUG=1 to see the traceback of an unexpected error.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SpectoolError as exc:
            error_console().print(Text(f"error: {exc}", style="bold red"), soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:  # a bug: still one line, the traceback on request
            if os.environ.get("SPECTOOL_DEBUG"):
                traceback.print_exc()
            message = f"internal error: {type(exc).__name__}: {exc} (set SPECTOOL_DEBUG=1 for the traceback)"
            error_console().print(Text(message, style="bold red"), soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


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
