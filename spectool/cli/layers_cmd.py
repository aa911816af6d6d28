"""`spectool layers`: the feature-layer ids each method picks for a target depth, drawn on the depth."""

from __future__ import annotations

import typer
from rich.table import Table
from rich.text import Text

from spectool.cli.application import app
from spectool.cli.help import method_choice
from spectool.cli.render import console, depth_bar, handles_errors, print_json
from spectool.errors import UsageError
from spectool.hub import default_model_ref, resolve_model
from spectool.registry import default_layer_ids, get, layer_methods, serving

LAYER_METHOD_NAMES = [m.name for m in layer_methods()]
LayerMethod = method_choice("LayerMethod", LAYER_METHOD_NAMES, extra=("all",))


@app.command("layers")
@handles_errors
def layers_command(
    model: str = typer.Argument(
        None, metavar="MODEL", help="Hub id, model directory or config.json (default: the embedded tiny target)."
    ),
    num_feature_layers: int = typer.Option(5, "--num-feature-layers", "-k", help="How many feature layers (K)."),
    method: LayerMethod = typer.Option(
        LayerMethod(LAYER_METHOD_NAMES[0]), "--method", "-m", help="Layer rule to apply."
    ),
    num_target_layers: int = typer.Option(
        None, "--num-target-layers", "-n", help="Target depth N, instead of reading it from a MODEL."
    ),
    revision: str = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show the feature-layer ids a method chooses, with a diagram of the target's depth.

    Id i is the output of decoder layer i (Hugging Face hidden_states\\[i+1]); SGLang and vLLM capture the input of
    layer i+1, the same tensor. EAGLE-3 always uses 3 layers (low, mid, high), whatever K is.
    """
    if num_target_layers is not None and model is not None:
        raise UsageError("give either MODEL or --num-target-layers, not both")
    if num_target_layers is not None:
        if num_target_layers < 1:
            raise UsageError(f"--num-target-layers must be at least 1, got {num_target_layers}")
        n, ref = num_target_layers, None
    else:
        info = resolve_model(model or default_model_ref(), revision=revision)
        n, ref = info.arch.num_hidden_layers, info.ref
        for note in info.notes:
            if not as_json:
                console().print(Text(f"note: {note}", style="yellow"))
    if not 1 <= num_feature_layers <= max(1, n - 1):
        raise UsageError(
            f"--num-feature-layers must be between 1 and {max(1, n - 1)} for a target with {n} layers, "
            f"got {num_feature_layers}"
        )

    methods = LAYER_METHOD_NAMES if method.value == "all" else [method.value]
    chosen: dict[str, list[int] | None] = {}
    problems: dict[str, str] = {}
    for m in methods:
        k = get(m).fixed_feature_count or num_feature_layers
        try:
            chosen[m] = default_layer_ids(m, n, k)
        except UsageError as exc:
            if len(methods) == 1:
                raise
            chosen[m], problems[m] = None, str(exc)

    served = {m: serving(m, ids, n) for m, ids in chosen.items() if ids is not None}
    if as_json:
        print_json(
            {
                "num_target_layers": n,
                "num_feature_layers": num_feature_layers,
                "layers": chosen,
                "serving": {m: s.to_json() for m, s in served.items()},
            }
        )
        return

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(no_wrap=True)
    for m in methods:
        ids = chosen[m]
        fixed = get(m).fixed_feature_count
        title = get(m).title + (f" ({fixed})" if fixed and num_feature_layers != fixed else "")
        if ids is None:
            table.add_row(title, Text(problems[m], style="red"))
            continue
        table.add_row(title, f"layer ids {ids}   engine ids {[i + 1 for i in ids]}")
        table.add_row("", depth_bar(n, ids))
    out = console()
    out.print(Text(f"Feature layers for {ref or f'a {n}-layer target'} (K = {num_feature_layers})", style="bold"))
    out.print(table)
    for m, served_m in served.items():
        if not served_m.portable:
            out.print(Text(f"note: {get(m).title}: {served_m.message()}", style="yellow"))
    out.print(
        Text(
            "Layer id i = output of decoder layer i (HF hidden_states[i+1]); engines (SGLang / vLLM) capture the "
            "same tensor as the input of layer i+1. E = embedding output (id -1). EAGLE-3 always fuses 3 layers.",
            style="dim",
        )
    )
    if any(not s.portable for s in served.values()):
        out.print(
            Text(
                f"Id {n - 1} is the post-final-norm hidden state. vLLM and SGLang capture a layer's input before the "
                f"final norm (engine ids 1..{n - 1}, i.e. layer ids 0..{n - 2}); spectool, DeepSpec and the z-lab "
                "dflash package read Hugging Face hidden_states and capture every id.",
                style="dim",
            )
        )
