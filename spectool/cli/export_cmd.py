"""`spectool export`: check a draft against a serving engine, write its layout, print the command that serves it."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

from spectool.cli.application import app
from spectool.cli.help import method_choice
from spectool.cli.init_cmd import method_by_config, refuse_to_overwrite
from spectool.cli.render import console, handles_errors, print_json
from spectool.export import ENGINES, check_servable
from spectool.paths import check_input_file, resolve_draft_dir

EngineChoice = method_choice("EngineChoice", ENGINES)


@app.command("export")
@handles_errors
def export_command(
    draft: Path = typer.Argument(..., metavar="DRAFT", help="A draft directory (any layout spectool reads)."),
    engine: EngineChoice = typer.Option(..., "--engine", "-e", help="The engine to serve it."),
    out: Path = typer.Option(None, "--out", "-o", help="Write the engine's layout here (and serve that copy)."),
    bench: Path = typer.Option(
        None, "--bench", help="A `spectool bench --json` file: choose the speculative tokens from its acceptance."
    ),
    force: bool = typer.Option(False, "--force", help="Replace a draft spectool wrote in --out (nothing else)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Check that an engine serves this draft (its method and feature layers), optionally write the engine's
    layout, and print the command that serves the target with it, the number of speculative tokens chosen from the
    draft's measured acceptance (a bench JSON, else its training summary), and why."""
    directory = resolve_draft_dir(draft)  # everything here is checked before torch loads
    method = method_by_config(directory)
    if method is not None:
        check_servable(engine.value, method, [], None)  # the layers are checked once the draft is loaded
    if bench is not None:
        check_input_file(bench, "--bench", "a `spectool bench --json` file")
    if out is not None:
        refuse_to_overwrite(out, force, directory, "DRAFT")
    from spectool.export import plan_export

    plan = plan_export(directory, engine.value, out=out, bench=bench)
    if as_json:
        print_json(plan.to_json())
        return
    screen = console()
    for note in plan.notes:
        screen.print(Text(f"note: {note}", style="yellow"))
    screen.print(f"{plan.engine} serves this {plan.method} draft; {plan.num_speculative_tokens} speculative tokens per "
                 f"round ({plan.why})", markup=False)  # fmt: skip
    screen.print(plan.command, soft_wrap=True, markup=False, highlight=False)  # to paste: never broken
    if plan.convert_command is not None:
        screen.print("or in vLLM's speculators format (speculators 0.9.0 converts it):", markup=False)
        screen.print(plan.convert_command, soft_wrap=True, markup=False, highlight=False)
