"""What `spectool demo` does, without the screen: the tiny target's training run and benchmark, the real model's
part (the shipped SmolLM2 draft on MT-Bench, or what to install for it), the reading of a result and the commands
suggested last. `cli/demo_cmd.py` calls these and draws each step."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from spectool import datasets, gguf
from spectool.errors import UsageError
from spectool.hub import ASSETS_DIR
from spectool.paths import quoted, shipped_drafts
from spectool.registry import DEFAULT_METHOD, get

#: The demo's conversations and held-out prompts: data sets embedded in spectool (`spectool.datasets`).
DEMO_DATA = "demo"
DEMO_PROMPTS = "heldout"
#: Training steps of the demo's draft. Planned by steps, not by the clock, so a busy or slow machine trains the
#: same draft (more slowly) instead of an undertrained one: a quiet 2-core Xeon ran 689 steps in 90 s (tau 1.54).
DEMO_STEPS = 600
#: Seconds the demo's training takes on that quiet machine, to say how this one compares.
QUIET_SECONDS = 80


def check_demo_data() -> None:
    """The demo's data ships with this copy of spectool (a usage error naming the missing file otherwise)."""
    for name in (DEMO_DATA, DEMO_PROMPTS):
        dataset = datasets.lookup(name)
        if datasets.installed_copy(dataset) is None:
            missing = ASSETS_DIR / dataset.embedded
            raise UsageError(f"this copy of spectool lacks the demo data ({missing}); reinstall spectool")


def train_config(target: str, workdir: Path, steps: int):
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


def held_out_prompts() -> list:
    """The demo's held-out conversations (its chat question is the first one's last message)."""
    from spectool.bench_prompts import load_prompts

    return load_prompts(datasets.resolve(DEMO_PROMPTS).path)


def slower_than_quiet(seconds: float, steps: int) -> float | None:
    """How many times as long the demo's training took here as on the quiet machine, when notably longer."""
    pace = seconds / max(1, steps) * DEMO_STEPS
    return pace / QUIET_SECONDS if pace > 1.5 * QUIET_SECONDS else None


@dataclass
class RealModelPart:
    """The demo's real-model part: the packaged SmolLM2 GGUF and the draft spectool ships for it."""

    name: str  # the model's name, e.g. SmolLM2-135M-Instruct
    draft: str  # the shipped draft's name
    missing: list[str]  # packages to install (pip names) before the part can run
    install_note: str  # what the GGUF is, for the install line

    @property
    def ready(self) -> bool:
        return not self.missing


def real_model_part() -> RealModelPart | None:
    """The real-model part, or None when this copy ships no draft for the packaged model."""
    packaged = gguf.PACKAGED[0]
    if packaged.shipped_draft not in shipped_drafts():
        return None
    mt_bench = datasets.lookup("mt-bench")
    missing = [packaged.pip_name] if gguf.installed_file(packaged) is None else []
    missing += [mt_bench.pip_name] if datasets.installed_copy(mt_bench) is None else []
    note = f"the model's {packaged.quantization} GGUF is {packaged.size}"
    return RealModelPart(packaged.hub_id.split("/")[-1], packaged.shipped_draft, missing, note)


def real_model_runtime(part: RealModelPart, prompts: int) -> tuple[Any, list]:
    """The shipped draft loaded with its target (`--verify auto`), and the first `prompts` MT-Bench first turns to
    bench it on against the target alone."""
    from spectool.bench_prompts import load_prompt_set
    from spectool.runtime import load_runtime

    return load_runtime(part.draft, verify="auto"), load_prompt_set("mt-bench", turns=1).prompts[:prompts]


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


def next_commands(draft: Path, train: str) -> list[str]:
    """The commands the demo suggests last, paths quoted for the shell so they paste as printed: chat and bench
    with the kept `draft`, the `train` command (`train_command`) that trains the same draft again, and a draft
    that ships with spectool."""
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
    return lines
