"""`spectool init` and `spectool convert`: write drafts in the formats vLLM, SGLang, dflash and DeepSpec load."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from spectool.cli.application import app
from spectool.cli.help import method_choice, method_option
from spectool.cli.method_options import with_method_options
from spectool.cli.render import console, handles_errors, human_bytes, human_count
from spectool.errors import SpectoolError
from spectool.hub import check_model_argument, resolve_model, weights_unreachable
from spectool.layers import parse_layer_ids
from spectool.paths import check_force_target, check_output_path, refuse_to_replace_input, resolve_draft_dir
from spectool.registry import conversions, get, serving


class DType(str, Enum):
    """The dtypes `spectool init --dtype` writes weights in."""

    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


def loaders_for(method: str, ids: list[int], num_target_layers: int) -> str:
    """Who loads a draft of `method` reading `ids`: the method's `loaders`, less vLLM and SGLang for ids they cannot
    capture."""
    found = get(method)
    if not found.reads_feature_layers:
        return found.loaders
    served = serving(method, ids, num_target_layers)
    if served.portable:
        return found.loaders
    return f"{', '.join(served.served_by)} (not vLLM or SGLang: they cannot capture layer {list(served.unportable)})"


def refuse_to_overwrite(out: Path, force: bool, source: str | Path | None = None, name: str = "SRC") -> None:
    """Never replace a user's non-empty directory unless they said --force, and then only one that holds nothing
    but what spectool wrote; never the command's own input (the directory `source`, called `name` on the command
    line), even with --force (exit 2)."""
    check_output_path(out)
    if source is not None and Path(source).expanduser().exists():
        source = Path(source).expanduser()
        refuse_to_replace_input(out, source if source.is_dir() else source.parent, name)
    check_force_target(out, force=force)  # what it lists is replaced by save_draft's swap, after every check


def check_method_options(method: str, method_options: dict[str, Any], part: str = "shape") -> None:
    """The methods' own options given: each one `method` takes (of `part`), in its range (exit 2, before torch)."""
    found = get(method)
    for name, value in method_options.items():
        found.check_option(name, value, part)
    found.check_options(method_options)


#: `spectool convert --to` choices: every layout some registered method converts to.
ConvertTarget = method_choice("ConvertTarget", list(conversions()))


@app.command("init")
@handles_errors
@with_method_options("shape")
def init_command(
    model: str = typer.Argument(..., metavar="MODEL", help="Target: Hub id, model directory or config.json."),
    method: str = method_option(...),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write the draft checkpoint to."),
    num_draft_layers: int = typer.Option(None, "--num-draft-layers", help="Decoder layers in the draft."),
    target_layer_ids: str = typer.Option(None, "--target-layer-ids", help='Feature layer ids, e.g. "1,9,17".'),
    num_feature_layers: int = typer.Option(None, "--num-feature-layers", "-k", help="DFlash / DSpark feature layers."),
    method_options: dict[str, Any] | None = None,
    seed: int = typer.Option(0, "--seed", help="Seed of the random initialisation."),
    dtype: DType = typer.Option(DType.bfloat16, "--dtype", help="dtype of the written weights."),
    revision: str = typer.Option(None, "--revision", help="Hub revision of the target."),
    force: bool = typer.Option(False, "--force", help="Replace a draft spectool wrote in --out (nothing else)."),
) -> None:
    """Build a freshly initialised draft for MODEL and write it in the method's ecosystem format.

    EAGLE-3 is written as SGLang / vLLM load it, DFlash as the z-lab dflash package and vLLM load it, DSpark in
    DeepSpec's layout. Tensors the format stores from the target (EAGLE-1 embeddings, EAGLE-3 lm_head rows,
    DSpark embeddings and lm_head) are read from the target's safetensors files without building the target.
    """
    check_model_argument(model)  # everything here is checked before torch loads
    refuse_to_overwrite(out, force, model, "MODEL")
    check_method_options(method, method_options or {})
    ids = parse_layer_ids(target_layer_ids) if target_layer_ids else None
    info = resolve_model(model, revision=revision)  # torch-free; init_draft builds on it
    if info.source == "catalog" and get(method).stores_target_tensors:
        raise SpectoolError(weights_unreachable(info.ref))  # before torch loads, with the next step
    from spectool.draft_init import init_draft

    result = init_draft(
        info,
        method,
        out,
        revision=revision,
        num_draft_layers=num_draft_layers,
        target_layer_ids=ids,
        num_feature_layers=num_feature_layers,
        seed=seed,
        **(method_options or {}),
        dtype=dtype.value,
    )
    out_console = console()
    for note in result.notes:
        out_console.print(Text(f"note: {note}", style="yellow"))
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    spec = result.spec
    table.add_row("draft", f"{spec.draft_class} for {result.target_ref} ({spec.architecture})")
    table.add_row("format", spec.checkpoint_format)
    table.add_row("feature layers", str(list(spec.target_layer_ids)))
    table.add_row(
        "parameters",
        f"{human_count(result.trainable_params)} trainable, {human_count(result.frozen_params)} frozen copies "
        f"of the target, {dtype.value}",
    )
    table.add_row("wrote", Text(f"{result.path}/", overflow="fold"))
    for path in sorted(result.path.iterdir()):
        table.add_row("", f"{path.name}  ({human_bytes(path.stat().st_size)})")
    table.add_row("loads in", loaders_for(spec.method, list(spec.target_layer_ids), spec.num_target_layers))
    out_console.print(table)


@app.command("convert")
@handles_errors
def convert_command(
    src: Path = typer.Argument(..., metavar="SRC", help="A draft checkpoint directory (any layout spectool reads)."),
    to: ConvertTarget = typer.Option(..., "--to", help="Layout to write."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write."),
    force: bool = typer.Option(False, "--force", help="Replace a draft spectool wrote in --out (nothing else)."),
) -> None:
    """Re-save a draft in the layout another tool loads (names, prefixes, architecture strings, d2t/t2d), then
    load the result to prove it."""
    directory = resolve_draft_dir(src, "SRC")  # before torch loads
    refuse_to_overwrite(out, force, src, "SRC")
    _check_layout_fits(directory, to.value)
    from spectool.checkpoint import convert

    loaded = convert(src, to.value, out)
    out_console = console()
    for note in loaded.notes:
        out_console.print(Text(f"note: {note}", style="yellow"))
    params = sum(p.numel() for p in loaded.model.parameters())
    out_console.print(
        f"wrote {loaded.method} draft ({human_count(params)} parameters) for {to.value} to {loaded.path}; "
        "reloaded it: every weight matched",
    )


def _check_layout_fits(directory: Path, to: str) -> None:
    """Refuse (exit 2, before torch loads) a draft whose config names a method the layout does not hold."""
    from spectool.registry import check_conversion

    method = method_by_config(directory)
    if method is not None:
        check_conversion(method, to)


def method_by_config(directory: Path) -> str | None:
    """The method a draft's config.json names, read without torch; None when it names none (the full load then
    also reads the weights)."""
    import json

    from spectool.errors import SpectoolError
    from spectool.registry import detect_method

    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        return detect_method(config).name
    except (OSError, ValueError, SpectoolError):
        return None
