"""The Typer app every command registers on: `spectool/cli/__init__.py` imports the command modules and tidies
the help once they have registered."""

from __future__ import annotations

import typer

from spectool import __version__

app = typer.Typer(
    name="spectool",
    help="Inspect, initialise, train and verify speculative-decoding drafts (EAGLE-1/2, EAGLE-3, DFlash, DSpark) "
    "for Hugging Face causal LMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"spectool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """spectool: from "I have a target model" to "I have a fast, verified draft and I can see it working"."""
