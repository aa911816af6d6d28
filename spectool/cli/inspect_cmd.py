"""`spectool inspect MODEL`: the target's architecture and, per method, the draft spectool would build."""

from __future__ import annotations

from typing import Any

import typer
from rich.text import Text

from spectool.cli.application import app
from spectool.cli.help import method_option
from spectool.cli.method_options import with_method_options
from spectool.cli.render import console, handles_errors, method_panel, print_json, target_panel
from spectool.hub import default_model_ref, resolve_model
from spectool.inspection import inspect_report, target_json
from spectool.registry import UnsupportedArchitecture, get, method_names


@app.command("inspect")
@handles_errors
@with_method_options("shape")
def inspect_command(
    model: str = typer.Argument(
        None, metavar="MODEL", help="Hub id, model directory or config.json (default: the embedded tiny target)."
    ),
    method: str = method_option("all", extra=("all",), help="Which draft method to show."),
    num_feature_layers: int = typer.Option(
        None, "--num-feature-layers", "-k", help="Feature layers for DFlash / DSpark (EAGLE-3 always uses 3)."
    ),
    num_draft_layers: int = typer.Option(None, "--num-draft-layers", help="Decoder layers in the draft."),
    method_options: dict[str, Any] | None = None,
    revision: str = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the Rich view."),
) -> None:
    """Show a target's architecture and, for each draft method, support, feature layers and draft layout.

    Reads config.json only (downloading nothing else and loading no weights). Layer id i is the output of
    decoder layer i (Hugging Face hidden_states\\[i+1]); -1 is the embedding output, N-1 the post-norm last
    hidden state.
    """
    info = resolve_model(model or default_model_ref(), revision=revision)
    methods = method_names() if method == "all" else [method]
    reports = inspect_report(
        info,
        methods,
        num_feature_layers=num_feature_layers,
        num_draft_layers=num_draft_layers,
        **(method_options or {}),
    )
    if as_json:
        print_json({"target": target_json(info), "methods": {m: r.to_json() for m, r in reports.items()}})
    else:
        out = console()
        for note in info.notes:
            out.print(Text(f"note: {note}", style="yellow"))
        out.print(target_panel(info))
        for report in reports.values():
            out.print(method_panel(info, report))
        out.print(
            Text(
                "Layer id i = output of decoder layer i (HF hidden_states[i+1]); SGLang / vLLM name the same tensor "
                "i+1 (the input of the next layer).",
                style="dim",
            )
        )
    if not any(r.supported for r in reports.values()) and any(
        r.spec is None and "has no draft" in (r.reason or "") for r in reports.values()
    ):
        supported = sorted({a for m in methods for a in get(m).architectures})
        raise UnsupportedArchitecture(
            f"no {'/'.join(get(m).title for m in methods)} draft for {', '.join(info.arch.architectures) or 'this target'}; "
            f"supported architectures: {', '.join(supported)}"
        )
