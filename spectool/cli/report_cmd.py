"""`spectool report`: what training runs and benchmarks did, in the terminal and (with --out) as a figure."""

from __future__ import annotations

from pathlib import Path

import typer

from spectool.cli.application import app
from spectool.cli.render import console, handles_errors


@app.command("report")
@handles_errors
def report_command(
    sources: list[Path] = typer.Argument(
        ..., help="Run directories of `spectool train` (their metrics.jsonl) and `spectool bench --json` files."
    ),
    out: Path = typer.Option(
        None,
        "--out",
        "-o",
        help="Also draw them into this .png or .html (needs matplotlib: pip install 'spectool\\[plot]'); the "
        "plotted numbers go to the same name with .csv.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing figure and its .csv."),
) -> None:
    """Summarise training runs and benchmarks: per run its steps, final loss, eval loss, acceptance length and
    tokens/s with sparklines of loss and acceptance length; per benchmark its acceptance length and tokens/s
    against the baselines. Several runs share the figure's axes, one colour each."""
    from spectool.report import check_figure_path, load_sources, require_matplotlib, summary_tables, write_figure

    if out is not None:
        check_figure_path(out, force=force)
        require_matplotlib()
    loaded = load_sources(sources)
    terminal = console()
    for table in summary_tables(loaded):
        terminal.print(table)
    if out is not None:
        figure, data = write_figure(loaded, out)
        terminal.print(f"wrote {figure} (plotted data: {data})", soft_wrap=True, markup=False)
