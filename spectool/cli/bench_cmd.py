"""`spectool bench`: acceptance length and speedup, measured side by side against honest baselines."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from spectool.bench_prompts import load_prompt_set
from spectool.cli.application import app
from spectool.cli.help import device_map_option
from spectool.cli.render import console, error_console, handles_errors, print_json, print_runtime_messages
from spectool.datasets import is_named, names
from spectool.errors import UsageError
from spectool.hub import check_device_map, check_model_argument
from spectool.paths import check_input_file, resolve_draft_dir, short_path
from spectool.sampling import SamplingParams

DEFAULT_PROMPTS = "heldout"  # the embedded tiny target's held-out prompts (`spectool.datasets`)
DEFAULT_BASELINES = "target,hf,prompt-lookup"
#: Each row's label in the table; all but "full-block" (added by --verify auto) can be asked for by --baselines.
BASELINE_LABELS = {
    "target": "target alone (spectool loop)",
    "hf": "HF generate",
    "prompt-lookup": "HF prompt lookup",
    "full-block": "same draft, drafting fully",
    "dflash-package": "z-lab dflash package loop",
}
CHOOSABLE_BASELINES = tuple(name for name in BASELINE_LABELS if name != "full-block")


@app.command("bench")
@handles_errors
def bench_command(
    draft: Path = typer.Option(..., "--draft", "-d", help="Draft checkpoint directory."),
    target: str = typer.Option(None, "--target", "-t", help="Target MODEL (default: the one the draft records)."),
    prompts: str = typer.Option(
        None,
        "--prompts",
        "-p",
        help="JSONL of {prompt} or {messages} rows, or a named set: mt-bench, humaneval, heldout \\[heldout].",
    ),
    turns: int = typer.Option(
        None, "--turns", help="User turns per prompt (MT-Bench has 2; later ones follow the model's answer) \\[all]."
    ),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="Tokens to generate per prompt."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (checked for losslessness)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Sample from the smallest set of tokens holding this mass (0-1]."),
    top_k: int = typer.Option(0, "--top-k", help="Sample from the K most likely tokens only (0 = all)."),
    baselines: str = typer.Option(
        DEFAULT_BASELINES, "--baselines", help=f"Comma list of {', '.join(CHOOSABLE_BASELINES)}."
    ),
    limit: int = typer.Option(None, "--limit", help="Use only the first N prompts."),
    chain_length: int = typer.Option(6, "--chain-length", help="Tokens per round for EAGLE chains."),
    max_drafts: int = typer.Option(None, "--max-drafts", help="Draft at most N tokens per round \\[the whole block]."),
    tree: str = typer.Option(None, "--tree", help="EAGLE-2 dynamic tree TOP_K,DEPTH,TOTAL (EAGLE drafts)."),
    verify: str = typer.Option(
        None,
        "--verify",
        help="auto: choose each round how many tokens to draft, 0 when drafting does not pay on this machine (adds "
        "a row for the same draft drafting fully); full: draft all the draft offers \\[auto; full with --batch-size].",
    ),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (prompt i uses SEED + i)."),
    profile: bool = typer.Option(
        False,
        "--profile",
        help="Also print what speculation costs here: the target's verify curve, the draft's cost, the acceptance "
        "each draft length needs to break even, and the speedup each acceptance length would give.",
    ),
    stop: list[str] = typer.Option(None, "--stop", help="End answers at this text (repeatable); eos always ends."),
    batch_size: int = typer.Option(
        1, "--batch-size", help="Decode N prompts together (no --tree / --verify auto; baselines target and hf)."
    ),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... \\[cuda when available, in bf16]."),
    device_map: str = device_map_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    plot: Path = typer.Option(
        None, "--plot", help="Also draw the results into this .png or .html (as `spectool report` does; + .csv)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing --plot figure and its .csv."),
) -> None:
    """Run the prompts speculatively and with each baseline, interleaved in one run, and report acceptance length
    (tokens per target forward, the bonus/correction token included), tokens/s and speedups. At temperature 0 the
    speculative output must equal the target's own greedy output for every prompt.
    """
    # Every check that needs no model runs first, so a mistyped option answers before torch loads.
    draft = resolve_draft_dir(draft)
    check_device_map(device_map, device)
    if target is not None:
        check_model_argument(target)
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if max_drafts is not None and max_drafts < 1:
        raise UsageError(f"--max-drafts must be at least 1, got {max_drafts}")
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)  # a UsageError when out of range
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if batch_size > 1 and baselines == DEFAULT_BASELINES:
        baselines = "target,hf"  # prompt lookup takes one prompt at a time
    if verify is None:
        verify = "auto" if batch_size == 1 else "full"  # a batch drafts for all its rows alike
    chosen = [b.strip() for b in baselines.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in CHOOSABLE_BASELINES]
    if unknown:
        raise UsageError(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(CHOOSABLE_BASELINES)}")
    if plot is not None:
        from spectool.report import check_figure_path, require_matplotlib

        check_figure_path(plot, force=force, option="--plot")
        require_matplotlib()
    if turns is not None and turns < 1:
        raise UsageError(f"--turns must be at least 1, got {turns}")
    prompts = prompts or DEFAULT_PROMPTS
    if not is_named(prompts):
        check_input_file(prompts, "--prompts", f"a JSONL file or a named set ({', '.join(names('prompts'))})")
    prompt_set = load_prompt_set(prompts, turns=turns)
    if prompt_set.note and not as_json:
        error_console().print(Text(f"note: {prompt_set.note}", style="yellow"))
    conversations = prompt_set.prompts[:limit]
    if batch_size > 1 and turns is None:
        for prompt in conversations:
            prompt.followups = []  # a batch answers first turns (later turns follow each answer one at a time)
    # torch and transformers load here, not at start-up.
    from spectool.bench import run_bench
    from spectool.runtime import load_runtime

    runtime = load_runtime(
        draft, target, device=device, chain_length=chain_length, verify=verify, tree=tree, device_map=device_map
    )
    print_runtime_messages(runtime)

    progress = Progress(
        TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=error_console(), transient=True, disable=as_json or not error_console().is_terminal,
    )  # fmt: skip
    with progress:
        task = progress.add_task("prompts", total=len(conversations))
        report = run_bench(
            runtime,
            conversations,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            baselines=chosen,
            seed=seed,
            stop_strings=stop or (),
            max_drafts=max_drafts,
            on_prompt=lambda _: progress.advance(task),
            batch_size=batch_size,
            profile=profile,
        )
    report.prompts = prompt_set.source
    if as_json:
        print_json(report.to_json())
    else:
        _render(report)
    if plot is not None:
        from spectool.report import BenchSource, write_figure

        figure, data = write_figure([BenchSource("bench", None, report.to_json())], plot)
        (error_console() if as_json else console()).print(f"wrote {figure} (plotted data: {data})", markup=False)
    if not report.passed:
        raise typer.Exit(1)


def _render(report) -> None:
    out = console()
    title = f"{report.method} draft {short_path(report.draft)} on {report.target}"
    if report.batch_size > 1:
        title += f", {report.batch_size} prompts per batch"
    out.print(Text(title, style="bold"))
    table = Table(show_edge=False)
    table.add_column("decoder")
    table.add_column("tokens/s", justify="right")
    target = report.baselines.get("target")
    if target:  # every row against the same reference
        table.add_column("vs target alone", justify="right")
    else:
        table.add_column("speculative's speedup over it", justify="right")
    verify = ", verify auto" if report.verify == "auto" else ""
    first = f"{report.tokens_per_second / target['tokens_per_second']:.2f}x" if target else ""
    table.add_row(f"speculative ({report.method}{verify})", f"{report.tokens_per_second:.1f}", first)
    for name, row in report.baselines.items():
        label = BASELINE_LABELS[name]
        if row.get("acceptance_length") is not None:
            label += f" (acceptance length {row['acceptance_length']:.2f})"
        ratio = row["tokens_per_second"] / target["tokens_per_second"] if target else row["speedup"]
        table.add_row(label, f"{row['tokens_per_second']:.1f}", f"{ratio:.2f}x")
    out.print(table)
    totals = f"{report.num_prompts} {'answers' if report.turns > 1 else 'prompts'}, {report.new_tokens} tokens"
    full = report.baselines.get("full-block", {}).get("acceptance_length")
    if report.acceptance_length is None:  # every answer ended with the prefill's token: nothing was verified
        out.print(f"acceptance length n/a (no verify round: each answer ended after one token); {totals}")
    else:
        hist = "  ".join(f"{k}:{v}" for k, v in sorted(report.acceptance_histogram.items()))
        per_position = " ".join(f"{p:.2f}" for p in report.accepted_per_position)
        if report.verify == "auto" and full is not None:  # the draft's own figure first, then what auto made of it
            rounds = sum(report.drafted_per_round.values())
            drafting = sum(v for k, v in report.drafted_per_round.items() if k) / max(1, rounds)
            out.print(
                f"the draft's acceptance length (drafting every round): {full:.2f} tokens per target forward "
                f"(bonus/correction included); under --verify auto, which drafted in {drafting:.0%} of its rounds: "
                f"{report.acceptance_length:.2f}; {totals}"
            )
        else:
            out.print(
                f"acceptance length {report.acceptance_length:.2f} tokens per target forward "
                f"(bonus/correction included); {totals}",
            )
        out.print(f"tokens per round: {hist}")
        if report.verify == "auto":
            drafted = "  ".join(f"{k}:{v}" for k, v in sorted(report.drafted_per_round.items()))
            out.print(f"tokens drafted per round (0: a plain target step): {drafted}")
        out.print(f"accept rate by draft position: {per_position}")
    if report.lossless is True:
        out.print(Text("lossless: output identical to the target's own greedy decoding on every prompt", "green"))
    elif report.lossless is False:
        out.print(
            Text(f"NOT lossless: prompts {report.mismatched_prompts} differ from the target's own output", "bold red")
        )
    if report.lossless_vs_hf_generate is True:
        out.print(Text("lossless: output identical to HF generate's greedy output on every prompt", "green"))
    elif report.lossless_vs_hf_generate is False:
        out.print(
            Text(f"NOT lossless: prompts {report.hf_mismatched_prompts} differ from HF generate's output", "bold red")
        )
    if report.categories:
        _render_categories(out, report)
    if report.profile is not None:
        _render_profile(out, report.profile)
    out.print(Text(f"machine: {report.machine}", style="dim"))


def _render_categories(out, report) -> None:
    """Per category (MT-Bench's eight) and per turn: acceptance length, tokens/s, speedup over the target alone."""
    table = Table(show_edge=False, title=f"{report.prompts} by category and turn", title_justify="left")
    for name, justify in (("part", "left"), ("answers", "right"), ("acceptance", "right"), ("tokens/s", "right")):
        table.add_column(name, justify=justify)
    table.add_column("vs target", justify="right")
    for name, row in report.categories.items():
        tau = f"{row['acceptance_length']:.2f}" if row["acceptance_length"] is not None else "n/a"
        speedup = f"{row['speedup_over_target']:.2f}x" if row["speedup_over_target"] is not None else ""
        table.add_row(name, str(row["answers"]), tau, f"{row['tokens_per_second']:.1f}", speedup)
    out.print(table)


def _render_profile(out, profile: dict) -> None:
    """`--profile`: costs in units of one plain target step (V(1))."""
    step_ms = profile["step_seconds"] * 1000
    curve = " ".join(f"{v:.2f}" for v in profile["verify_curve"])
    drafted = len(profile["verify_curve"]) - 1
    out.print(
        f"cost profile (unit: one target step, {step_ms:.2f} ms): verify of n = 1.. tokens {curve}; draft "
        f"{profile['draft_cost']:.2f} per round of {drafted} tokens, {profile['draft_steps_per_token']:.3f} per drafted "
        f"token (from {profile['drafting_rounds_measured']} drafting rounds)",
    )
    out.print(
        f"the machine's limit: a step reads {profile['weight_bytes_per_step'] / 2**20:,.0f} MiB of weights at "
        f"{profile['memory_bandwidth_gb_s']:.1f} GB/s measured, so at least {profile['floor_ms']:.2f} ms; this loop's "
        f"step is {profile['step_over_floor']:.2f}x that floor",
    )
    kernels = profile.get("kernels")
    if kernels and kernels["chosen"]:
        one = ", ".join(f"{kind} {forms['1']}" for kind, forms in kernels["forms"].items())
        four = ", ".join(f"{kind} {forms['4']}" for kind, forms in kernels["forms"].items())
        out.print(
            f"matrix kernels timed on this CPU: at 1 token {one}; at 4 tokens {four} (SPECTOOL_KERNELS=plain: "
            "F.linear everywhere)",
        )
        if kernels.get("native_unavailable"):
            out.print(
                f"spectool's native kernel is not built here ({kernels['native_unavailable']}): a C compiler with "
                "OpenMP (cc, or $CC) builds it once, and it reads 1-8 token rows at close to the memory's speed",
            )
    table = Table(show_edge=False)
    table.add_column("drafted", justify="right")
    table.add_column("tokens per round to break even", justify="right")
    table.add_column("= acceptance at every position", justify="right")
    for row in profile["break_even"]:
        rate = f"{row['break_even_rate']:.0%}" if row["break_even_rate"] is not None else "out of reach"
        table.add_row(str(row["drafted"]), f"{row['break_even_tokens']:.2f}", rate)
    out.print(table)
    speedups = "  ".join(f"{tau}: {x:.2f}x" for tau, x in profile["speedup_at_acceptance_length"].items())
    out.print(f"speedup over the target alone at acceptance length (drafting fully): {speedups}")
