"""`spectool inspect MODEL`: the target's architecture and, per method, the draft spectool would build."""

from __future__ import annotations

import typer
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from spectool.cli import app
from spectool.cli.help import method_choice
from spectool.cli.render import console, depth_bar, handles_errors, human_bytes, human_count, print_json, shape_text
from spectool.hub import TargetInfo, default_model_ref, resolve_model
from spectool.registry import UnsupportedArchitecture, get, method_names
from spectool.report import MethodReport, inspect_report, target_json

ROLE_STYLE = {"trainable": "green", "frozen": "yellow", "buffer": "magenta", "borrowed": "dim"}
ROLE_TEXT = {
    "trainable": "trainable",
    "frozen": "frozen copy",
    "buffer": "buffer",
    "borrowed": "target's (not stored)",
}


MethodChoice = method_choice("MethodChoice", ("all", *method_names()))


@app.command("inspect")
@handles_errors
def inspect_command(
    model: str = typer.Argument(
        None, metavar="MODEL", help="Hub id, model directory or config.json (default: the embedded tiny target)."
    ),
    method: MethodChoice = typer.Option(MethodChoice("all"), "--method", "-m", help="Which draft method to show."),
    num_feature_layers: int = typer.Option(
        None, "--num-feature-layers", "-k", help="Feature layers for DFlash / DSpark (EAGLE-3 always uses 3)."
    ),
    num_draft_layers: int = typer.Option(None, "--num-draft-layers", help="Decoder layers in the draft."),
    block_size: int = typer.Option(None, "--block-size", help="DFlash / DSpark block size."),
    revision: str = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the Rich view."),
) -> None:
    """Show a target's architecture and, for each draft method, support, feature layers and draft layout.

    Reads config.json only (downloading nothing else and loading no weights). Layer id i is the output of
    decoder layer i (Hugging Face hidden_states\\[i+1]); -1 is the embedding output, N-1 the post-norm last
    hidden state.
    """
    info = resolve_model(model or default_model_ref(), revision=revision)
    methods = method_names() if method.value == "all" else [method.value]
    reports = inspect_report(
        info,
        methods,
        num_feature_layers=num_feature_layers,
        num_draft_layers=num_draft_layers,
        block_size=block_size,
    )
    if as_json:
        print_json({"target": target_json(info), "methods": {m: r.to_json() for m, r in reports.items()}})
    else:
        out = console()
        for note in info.notes:
            out.print(Text(f"note: {note}", style="yellow"), soft_wrap=True)
        out.print(_target_panel(info))
        for report in reports.values():
            out.print(_method_panel(info, report))
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


def _target_panel(info: TargetInfo) -> Panel:
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
    title = f"[bold]{info.ref}[/]  [dim]({source[info.source]})[/]"
    return Panel(table, title=title, title_align="left")


def _method_panel(info: TargetInfo, report: MethodReport) -> Panel:
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
    if spec.block_size:
        shape += f", block size {spec.block_size}"
    if spec.method in ("dflash", "dspark"):
        shape += f", mask token {spec.mask_token_id if spec.mask_token_id is not None else '? (pass --mask-token-id)'}"
    if spec.method == "eagle3":
        shape += f", draft vocab {spec.draft_vocab_size or info.arch.vocab_size}"
    if spec.markov_rank:
        shape += f", Markov rank {spec.markov_rank}"
    facts.add_row("draft", shape)
    facts.add_row(
        "parameters",
        f"{human_count(layout.trainable_params)} trainable, {human_count(layout.frozen_params)} frozen copies; "
        f"checkpoint {human_bytes(layout.stored_bytes_bf16)} in bf16",
    )
    facts.add_row("init writes", spec.checkpoint_format)
    for note in report.notes:
        facts.add_row("note", Text(note, style="yellow"))

    modules = Table(box=None, padding=(0, 1), show_edge=False, header_style="dim")
    modules.add_column("tensor", overflow="fold")
    modules.add_column("shape")
    modules.add_column("params", justify="right")
    modules.add_column("role")
    for t in _collapse_layers(layout.tensors):
        modules.add_row(
            t[0], t[1], human_count(t[2]), Text(ROLE_TEXT[t[3]] if t[3] in ROLE_TEXT else t[3], ROLE_STYLE.get(t[3]))
        )
    return Panel(Group(facts, Text(""), modules), title=title, title_align="left")


def _collapse_layers(tensors) -> list[tuple[str, str, int, str]]:
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
