"""`spectool train`: train a draft for a target on conversations (or on stored target features)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from spectool.cli.application import app
from spectool.cli.help import method_option
from spectool.cli.method_options import with_method_options
from spectool.cli.render import console, error_console, handles_errors, human_count, print_json, stats_column
from spectool.datasets import check_data_argument
from spectool.errors import UsageError
from spectool.hub import check_model_argument
from spectool.paths import (
    check_force_target,
    check_input_file,
    check_output_path,
    features_method,
    quoted,
    refuse_inputs_inside,
    saved_run_config,
)

#: From this many target tokens on, `train` suggests a draft vocabulary (`spectool data vocab`) for the drafts
#: that score the whole vocabulary: its rows are then a large part of a drafting step.
VOCAB_HINT_TOKENS = 32768

_HELP = (
    "Train a draft for a target: run the frozen target over your conversations and fit the method's objective.\n\n"
    "The draft's shape defaults to the method's, scaled to the target (as `spectool init` makes it); the learning "
    "rate defaults to 6e-4 for DFlash / DSpark and 1e-4 for EAGLE, with a linear warmup (>= 20 steps on long runs) "
    "and a cosine decay. --batch-size counts the sequences of a micro-batch over all processes together.\n\n"
    "OUT receives train_config.json, metrics.jsonl (also sent to OUT/tensorboard or W&B: --report-to), "
    "checkpoints/step-*/ (every --save-every steps, the last --keep-last kept) and, at the end, the trained draft in "
    "the method's ecosystem format: `spectool chat --draft OUT` runs it, `spectool report OUT` shows the run. Ctrl-C "
    "saves a checkpoint and stops; --resume continues exactly where it stopped.\n\n"
    "Options can also come from --config FILE (TOML, YAML or JSON, keys named like the options: max_steps = 200; "
    "relative paths are read from the file's folder); options given on the command line win. Several processes: "
    "torchrun --nproc-per-node N -m spectool train ... (DDP; --fsdp shards the draft)."
)


@app.command("train", help=_HELP)
@handles_errors
@with_method_options("shape", "objective")
def train_command(
    target: str = typer.Option(None, "--target", "-t", help="Target model: Hub id or model directory."),
    method: str = method_option(None),
    data: str = typer.Option(
        None,
        "--data",
        "-d",
        help="Conversations: .jsonl / .json / .parquet file, a directory of them, or a Hub dataset.",
    ),
    out: Path = typer.Option(None, "--out", "-o", help="Run directory (checkpoints, metrics, the final draft)."),
    config_file: Path = typer.Option(
        None, "--config", "-c", help="TOML, YAML or JSON file of options (relative paths: from its folder)."
    ),
    features: str = typer.Option(None, "--features", help="Train from `spectool data features` output instead."),
    init: str = typer.Option(None, "--init", help="Start from this draft directory (e.g. from `spectool init`)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUT from its latest checkpoint."),
    force: bool = typer.Option(
        False, "--force", help="Replace an earlier spectool run in OUT (only the files spectool wrote)."
    ),
    max_steps: int = typer.Option(None, "--max-steps", help="Optimizer steps (with --epochs, whichever ends first)."),
    epochs: float = typer.Option(None, "--epochs", help="Passes over the training split [1]."),
    max_minutes: float = typer.Option(
        None,
        "--max-minutes",
        help="Wall-clock budget, loading and evaluations included: plan the steps from the measured speed (with --max-steps/--epochs as caps).",
    ),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Sequences per micro-batch, all processes [8]."),
    grad_accum: int = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step [1]."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate [6e-4 DFlash/DSpark, 1e-4 EAGLE]."),
    warmup_steps: int = typer.Option(None, "--warmup-steps", help="Linear warmup steps \\[min(max(20, 2%), 10%)]."),
    min_lr_ratio: float = typer.Option(None, "--min-lr-ratio", help="Final lr as a share of the peak [0.1]."),
    weight_decay: float = typer.Option(None, "--weight-decay", help="AdamW weight decay on matrices [0]."),
    grad_clip: float = typer.Option(None, "--grad-clip", help="Max gradient norm, 0 = off [1.0]."),
    max_length: int = typer.Option(None, "--max-length", help="Tokens per example (longer ones are cut) [2048]."),
    pack: bool = typer.Option(None, "--pack/--no-pack", help="Pack several conversations per row \\[no]."),
    assistant_turns: str = typer.Option(None, "--assistant-turns", help="Supervise 'all' assistant turns or 'last'."),
    chat_template: str = typer.Option(None, "--chat-template", help="A Jinja chat template file to use instead."),
    skip_bad_rows: bool = typer.Option(None, "--skip-bad-rows", help="Count and skip malformed rows."),
    eval_fraction: float = typer.Option(None, "--eval-fraction", help="Held-out share of the examples [0.02]."),
    eval_every: int = typer.Option(None, "--eval-every", help="Steps between evaluations, 0 = at the end [500]."),
    eval_batches: int = typer.Option(None, "--eval-batches", help="At most this many held-out batches per eval."),
    save_every: int = typer.Option(None, "--save-every", help="Steps between checkpoints, 0 = only on Ctrl-C [500]."),
    keep_last: int = typer.Option(None, "--keep-last", help="Checkpoints to keep [3]."),
    log_every: int = typer.Option(None, "--log-every", help="Steps between metrics.jsonl rows [10]."),
    report_to: str = typer.Option(
        None,
        "--report-to",
        help="Also send the metrics to: tensorboard (OUT/tensorboard), wandb, none; comma-separated "
        "\\[tensorboard when installed].",
    ),
    seed: int = typer.Option(None, "--seed", help="Seed of the draft, the data order and the objective [0]."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... \\[cuda when available]."),
    dtype: str = typer.Option(
        None, "--dtype", help="auto (target bf16 on CUDA and AMX CPUs; draft bf16 autocast on CUDA), float32, bfloat16."
    ),
    save_dtype: str = typer.Option(None, "--save-dtype", help="dtype of the final draft's weights \\[bfloat16]."),
    fsdp: bool = typer.Option(None, "--fsdp", help="Shard the draft with FSDP2 across torchrun processes."),
    shard_target: bool = typer.Option(
        None, "--shard-target", help="Shard the frozen target's decoder layers with FSDP2 across torchrun processes."
    ),
    num_draft_layers: int = typer.Option(None, "--num-draft-layers", help="Decoder layers in the draft."),
    target_layer_ids: str = typer.Option(None, "--target-layer-ids", help='Feature layer ids, e.g. "1,9,17".'),
    num_feature_layers: int = typer.Option(None, "--num-feature-layers", "-k", help="DFlash / DSpark feature layers."),
    method_options: dict[str, Any] | None = None,
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    from spectool.training.config import read_config_file, resolve_config

    options: dict[str, Any] = {  # `TrainConfig`'s fields, as given (None: not given)
        "target": target,
        "method": method,
        "data": data,
        "out": str(out) if out is not None else None,
        "features": features,
        "init": init,
        "max_steps": max_steps,
        "epochs": epochs,
        "max_minutes": max_minutes,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "lr": lr,
        "warmup_steps": warmup_steps,
        "min_lr_ratio": min_lr_ratio,
        "weight_decay": weight_decay,
        "grad_clip": grad_clip,
        "max_length": max_length,
        "pack": pack,
        "assistant_turns": assistant_turns,
        "chat_template": chat_template,
        "skip_bad_rows": skip_bad_rows,
        "eval_fraction": eval_fraction,
        "eval_every": eval_every,
        "eval_batches": eval_batches,
        "save_every": save_every,
        "keep_last": keep_last,
        "log_every": log_every,
        "report_to": report_to,
        "seed": seed,
        "device": device,
        "dtype": dtype,
        "save_dtype": save_dtype,
        "fsdp": fsdp,
        "shard_target": shard_target,
        "num_draft_layers": num_draft_layers,
        "target_layer_ids": target_layer_ids,
        "num_feature_layers": num_feature_layers,
        **(method_options or {}),  # the method's own options, named at the top level as in a config file
    }
    given = {name: value for name, value in options.items() if value is not None}
    file_values = read_config_file(config_file) if config_file is not None else {}
    if "method" not in given and "method" not in file_values and given.get("features") and not resume:
        method_of_features = features_method(Path(given["features"]).expanduser())
        if method_of_features is not None:
            given["method"] = method_of_features
    out_dir = given.get("out") or file_values.get("out")
    if out_dir is None:
        raise UsageError("give --out DIR (the run directory)")
    check_output_path(out_dir)
    saved = None
    if resume:
        if force:
            raise UsageError("--resume continues the run in OUT and --force replaces it: pick one")
        saved = saved_run_config(Path(out_dir).expanduser())
    config = resolve_config({**given, "out": out_dir}, config_file=config_file, saved=saved)
    _check_inputs(config)
    if not resume:  # the trainer checks OUT again (for Python callers); here it answers before torch loads
        inputs = {
            "--target": config.target,
            "--data": config.data,
            "--init": config.init,
            "--features": config.features,
        }
        refuse_inputs_inside(config.out, inputs)
        check_force_target(config.out, force=force, hint="continue its run with --resume")
    created = _missing_dirs(Path(config.out))
    try:
        _run(config, resume=resume, force=force, as_json=as_json)
    except BaseException:
        from spectool.training.distributed import launched_as_main

        if launched_as_main():
            _remove_empty_dirs(created)
        raise


def _check_inputs(config: Any) -> None:
    """The run's inputs, checked on the filesystem before torch loads, so a mistyped path answers at once."""
    if config.target is not None:
        check_model_argument(config.target)
    if config.features is not None:
        if not Path(config.features).expanduser().is_dir():
            raise UsageError(f"no such features directory: {config.features} (make one with `spectool data features`)")
    elif config.data is not None:
        check_data_argument(config.data)
    if config.init is not None and not (Path(config.init).expanduser() / "config.json").is_file():
        raise UsageError(
            f"--init {config.init} is not a draft checkpoint directory (no config.json); make one with `spectool init`"
        )
    if config.chat_template is not None:
        check_input_file(config.chat_template, "--chat-template", "a Jinja template file")


def _missing_dirs(out: Path) -> list[Path]:
    """OUT and those of its parents that do not exist yet (the run would create them), deepest first."""
    missing = []
    for path in (out, *out.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def _remove_empty_dirs(created: list[Path]) -> None:
    """After a failed run: remove the directories it created (OUT and its new parents) where nothing was written,
    so a mistake leaves no empty run directory behind. A directory holding any file is kept."""
    if not created:
        return
    for root, dirs, _files in os.walk(created[0], topdown=False):
        for name in dirs:
            try:
                (Path(root) / name).rmdir()  # only empty directories go; symlinks and full ones stay
            except OSError:
                pass
    for directory in created:
        try:
            directory.rmdir()
        except OSError:
            return


def progress_columns(out: Any) -> tuple:
    """The training bar: step count, bar, running figures (cut first when the line is short), elapsed, eta."""
    return (
        TextColumn("[bold]step"),
        MofNCompleteColumn(),
        BarColumn(bar_width=12),
        stats_column(out),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )


def _run(config: Any, *, resume: bool, force: bool, as_json: bool) -> None:
    from spectool.training.distributed import launched_as_main
    from spectool.training.progress import TrainEvent, TrainingInterrupted
    from spectool.training.trainer import Trainer

    main_process = launched_as_main()
    out_console = console()
    show = out_console.is_terminal and not as_json and main_process
    plain = not out_console.is_terminal and not as_json and main_process  # a log file: one line per logged row
    with Progress(*progress_columns(out_console), console=out_console, disable=not show, transient=False) as bar:
        task = bar.add_task("train", total=None, stats="")
        first_step_shown: list[int] = []

        def on_event(event: TrainEvent) -> None:
            if event.kind == "start" and event.info is not None:
                bar.update(task, total=event.total_steps, completed=event.step)
                _print_warnings(error_console() if as_json else bar.console, event.info)
                if not as_json:
                    _print_start(bar.console, event.info)
            elif event.kind == "step":
                bar.update(task, completed=event.step, total=event.total_steps)
                if plain and not first_step_shown:  # a log file hears within one step that training runs
                    first_step_shown.append(event.step)
                    total = event.total_steps if event.total_steps is not None else "?"
                    out_console.print(
                        f"step {event.step}/{total} done (then a line every {config.log_every} steps)",
                        soft_wrap=True,
                        markup=False,
                        highlight=False,
                    )
            elif event.kind == "log" and event.row is not None:
                bar.update(task, stats=_stats_text(event.row))
                if plain:
                    total = event.total_steps if event.total_steps is not None else "?"
                    line = f"step {event.step}/{total}  {_stats_text(event.row)}"
                    out_console.print(line, soft_wrap=True, markup=False, highlight=False)

        try:
            result = Trainer(config, resume=resume, force=force, callback=on_event).run()
        except TrainingInterrupted as exc:
            bar.stop()
            if main_process:
                error_console().print(Text(f"stopped: {exc}", style="yellow"))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            bar.stop()
            message = "stopped at once (second Ctrl-C) without saving; the last checkpoint in OUT is kept"
            error_console().print(Text(message, style="yellow"))
            raise typer.Exit(130) from None
    if main_process:
        _print_result(out_console, result, config, as_json=as_json)


def _print_result(out_console: Any, result: Any, config: Any, *, as_json: bool) -> None:
    """What the run did: one JSON object, or a summary line and where to look next."""
    from spectool.training.reporting import resolve_report_to

    if as_json:
        print_json(
            {
                "out": str(result.out),
                "steps": result.steps,
                "tokens": result.tokens,
                "seconds": round(result.seconds, 3),
                "tokens_per_second": round(result.tokens / result.seconds, 1) if result.seconds else None,
                "metrics": result.metrics,
                "eval_metrics": result.eval_metrics,
                "resumed_from": result.resumed_from,
            }
        )
        return
    metrics = {**result.metrics, **result.eval_metrics}
    rate = f"{result.tokens / result.seconds:,.0f} tokens/s" if result.seconds else ""
    summary = f"Trained {result.steps} steps on {human_count(result.tokens)} tokens in {result.seconds:.1f} s ({rate})"
    if metrics:
        summary += "; " + _stats_text(metrics)
        if "acceptance_length" in metrics:
            summary += " (tau: simulated acceptance length, bonus token included)"
    out_console.print(summary, markup=False)
    out_console.print(
        f"wrote the draft to {result.out} (try it: spectool chat --draft {quoted(result.out)}); metrics in "
        f"{result.out / 'metrics.jsonl'}",
        soft_wrap=True,  # a command to paste: the terminal folds it, no newline is inserted
        markup=False,
    )
    hint = vocab_hint(result.out)
    if hint:
        out_console.print(Text(f"note: {hint}", style="dim"), soft_wrap=True)
    see = f"see the run: spectool report {quoted(result.out)} (--out report.png draws it)"
    if "tensorboard" in resolve_report_to(config.report_to):
        see += f"; tensorboard --logdir {quoted(result.out / 'tensorboard')}"
    out_console.print(see, soft_wrap=True, markup=False, highlight=False)  # commands to paste: never broken


def vocab_hint(out: Path) -> str | None:
    """For a draft that scores the target's whole vocabulary at every drafted position (EAGLE-1, DFlash, DSpark) on
    a target with a large one: the `data vocab` command that makes its drafting cheaper. None otherwise."""
    from spectool.checkpoint import METADATA_FILE, DraftMetadata
    from spectool.registry import get

    try:
        metadata = DraftMetadata.from_json(json.loads((out / METADATA_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    vocab = metadata.target_vocab_size or 0
    if vocab < VOCAB_HINT_TOKENS or not get(metadata.method).takes_draft_vocab:
        return None
    return (
        f"this draft scores all {vocab:,} of the target's tokens at every drafted position; `spectool data vocab "
        f"--draft {quoted(out)} --size 8192` keeps the most frequent answer tokens (on SmolLM2: 98% of them, a "
        "third of the block's time)"
    )


def _print_warnings(out: Any, info: dict[str, Any]) -> None:
    """Notes and skipped rows (on stderr with --json, so the JSON on stdout stays clean)."""
    for note in info.get("notes", []):
        out.print(Text(f"note: {note}", style="yellow"))
    data = info.get("data", {})
    if data.get("rows_skipped"):
        out.print(Text(f"warning: skipped {data['rows_skipped']} rows, e.g.:", style="yellow"))
        for reason in data.get("skip_reasons", [])[:3]:
            out.print(Text(f"  {reason}", style="yellow"))


def _print_start(out: Any, info: dict[str, Any]) -> None:
    start = f" (resuming after step {info['start_step']})" if info.get("start_step") else ""
    steps = f"{info['total_steps']} steps"
    if info.get("max_minutes"):
        cap = f", at most {info['step_cap']}" if info.get("step_cap") else ""
        steps = f"{info['max_minutes']:g} minutes of steps (planned from the measured speed{cap})"
    out.print(
        Text(
            f"{info['method']} draft ({info['draft_class']}, {human_count(info['trainable_params'])} trainable) for "
            f"{info['target']}, feature layers {info['target_layer_ids']}: {info['train_examples']} training / "
            f"{info['eval_examples']} held-out examples, {steps} of {info['global_batch']} sequences{start}, "
            f"lr {info['lr']:g} (warmup {info['warmup_steps']}), {info['mode']}, "
            f"{info['world_size']} process(es) on {info['device']} (target {info['target_dtype']}, draft "
            f"{info['draft_dtype']})"
        ),
    )


def _stats_text(row: dict[str, Any]) -> str:
    """``loss 2.31  acc@1 45%  tau 1.92  6,500 tok/s  lr 6e-04`` (tau = acceptance length incl. the bonus token)."""
    parts = []
    if row.get("loss") is not None:
        parts.append(f"loss {row['loss']:.3f}")
    if "acc@1" in row:
        parts.append(f"acc@1 {row['acc@1']:.0%}")
    if "acceptance_length" in row:
        parts.append(f"tau {row['acceptance_length']:.2f}")
    if "eval_loss" in row:
        parts.append(f"eval loss {row['eval_loss']:.3f}")
    if "eval_acceptance_length" in row:
        parts.append(f"eval tau {row['eval_acceptance_length']:.2f}")
    if row.get("tokens_per_second"):
        parts.append(f"{row['tokens_per_second']:,.0f} tok/s")
    if "lr" in row:
        parts.append(f"lr {row['lr']:.1e}")
    return "  ".join(parts)
