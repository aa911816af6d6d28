"""Real-size rehearsal: every spectool command on random-weight targets with real configs and vocabularies.

Builds Qwen3-0.6B and Llama-3.2-1B shaped targets (real layer counts, widths, heads, vocabulary sizes, tied
embeddings, Llama 3 rope scaling) with random weights, saved in bf16 as safetensors beside a small word-level
ChatML tokenizer built here (its vocabulary is much smaller than the model's, as real Qwen3's 151,669 tokens are
smaller than its 151,936 rows). Then runs each command through the CLI in its own process (`python -m spectool
...`): inspect, layers, init for each supported method, data features, train for 2 steps (and 2-process
`torchrun ... --fsdp` and `--shard-target` on gloo), bench (1 prompt x 8 tokens against the target alone) and convert. Nothing is
downloaded.

Prints a Markdown table of each step's wall time and peak resident memory (the high-water mark of the process,
from wait4; for torchrun the largest single process, so a per-process figure), with a memory budget per step and a flag where the peak
exceeds it.

    python examples/rehearsal.py --out /tmp/rehearsal                 # everything, both targets
    python examples/rehearsal.py --out /tmp/rehearsal --targets qwen3-0.6b --quick   # what tests/test_rehearsal.py runs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

GIB = 1024**3

#: Real architecture facts (config.json of each model; /work/shared/MODELS.md).
TARGETS: dict[str, dict] = {
    "qwen3-0.6b": dict(
        architectures=["Qwen3ForCausalLM"],
        model_type="qwen3",
        num_hidden_layers=28,
        hidden_size=1024,
        intermediate_size=3072,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    "llama-3.2-1b": dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        num_hidden_layers=16,
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
}
METHODS = {"qwen3-0.6b": ("eagle1", "eagle3", "dflash", "dspark"), "llama-3.2-1b": ("eagle1", "eagle3")}

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
WORDS = (
    "system user assistant you are a helpful bot hi hello there how is it going fine thanks what the time now one "
    "two three four five six seven eight nine ten yes no maybe tell me about cats dogs they like to sleep and play "
    "good morning evening night see later bye please write code print def return x y z if else for in of on with "
    "this that answer question ok sure"
).split()
PUNCTUATION = ("?", "!", ".", ",", ":", "(", ")", "=", "+", "'")
WHITESPACE = ("\n", "\n\n", " ", "  ", "    ")
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer():
    """A word-level ChatML tokenizer (about 100 tokens) with a chat template; no download."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, "[UNK]", *WHITESPACE, *PUNCTUATION, *WORDS):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+|\w+|[^\w\s]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        chat_template=CHATML_TEMPLATE,
    )


def build_target(name: str, directory: Path) -> int:
    """Write a random-weight bf16 target with `name`'s real config to `directory`; returns its parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    facts = dict(TARGETS[name])
    tokenizer = build_tokenizer()
    config = AutoConfig.for_model(
        facts.pop("model_type"),
        **facts,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: no fp32 copy of the weights on the way
    try:
        model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    count = sum(p.numel() for p in model.parameters())
    del model
    return count


def conversations(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) + " ?"
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 30))) + " ."
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@dataclass
class Step:
    target: str
    name: str
    args: list[str]
    budget_gib: float
    torchrun: bool = False
    seconds: float = 0.0
    peak_gib: float = 0.0
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def over_budget(self) -> bool:
        return self.peak_gib > self.budget_gib


#: Runs a command and writes its peak RSS (from wait4) to a file. Linux counts the memory a process had before it
#: exec'd into its peak, so a command started straight from a large process (a test runner that has loaded models)
#: reports that process's size; started from this small launcher, it starts from the launcher's few MB.
LAUNCHER = (
    "import os, subprocess, sys\n"
    "child = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(child.pid, 0)\n"
    "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run_step(step: Step, env: dict, timeout: float) -> Step:
    """Run one CLI command in its own session; wall time and its peak RSS (largest process of its tree) from wait4,
    taken by a small launcher process (see `LAUNCHER`)."""
    if step.torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        command += ["-m", "spectool", *step.args]
    else:
        command = [sys.executable, "-m", "spectool", *step.args]
    log_dir = Path(env["REHEARSAL_LOGS"])
    stem = f"{step.target}-{step.name}".replace(" ", "_").replace("/", "_")
    out_path, err_path = log_dir / f"{stem}.out", log_dir / f"{stem}.err"
    peak_path = log_dir / f"{stem}.maxrss"
    peak_path.unlink(missing_ok=True)
    command = [sys.executable, "-c", LAUNCHER, str(peak_path), *command]
    start = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env, start_new_session=True)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(process.pid, 0)
                step.notes.append(f"killed after {timeout:.0f} s")
                break
            time.sleep(0.05)
    step.seconds = time.perf_counter() - start
    step.returncode = os.waitstatus_to_exitcode(status)
    process.returncode = step.returncode
    # KiB on Linux; includes reaped descendants (torchrun workers). The launcher's own figure if it was killed.
    peak_kib = int(peak_path.read_text()) if peak_path.is_file() else usage.ru_maxrss
    step.peak_gib = peak_kib * 1024 / GIB
    step.stdout, step.stderr = out_path.read_text(), err_path.read_text()
    return step


def draft_params(inspect_json: dict, method: str) -> tuple[int, int]:
    """(trainable, frozen) parameters of the method's draft, as `inspect --json` reports them."""
    entry = inspect_json.get("methods", {}).get(method) or {}
    return int(entry.get("trainable_params") or 0), int(entry.get("frozen_params") or 0)


INTERPRETER_GIB = 0.75  # python + torch + transformers imported, allocator slack


def budgets(
    target_params: int, vocab: int, hidden: int, layers: int, draft: tuple[int, int], tokens: int
) -> dict[str, float]:
    """Peak-RSS budget (GiB) per kind of step.

    * inspect / layers / convert: interpreter only, plus the draft's weights (convert loads the draft, fp32).
    * init: the target's embedding (and lm_head, tied here) rows it reads, in fp32, plus the draft (fp32) twice
      (built, then written).
    * features / bench / train: while loading, transformers maps the bf16 file (resident as it is read) beside
      the fp32 weights it makes from it, so the file's size counts once.
    * features / bench: the target in the dtype it runs on this CPU (fp32: no AMX), the draft in fp32, and one
      full-vocabulary fp32 logits row per token of one batch plus hidden states of every layer; bench also the
      column-major weight copies the lean forward may keep (`spectool.decoding.kernels`: at most 25% of the
      target's weights).
    * train: the frozen target in fp32, the draft's trainable fp32 weights + gradients + two AdamW moments (16
      bytes per parameter) and its frozen ones (embedding / lm_head copies) in fp32, and a batch's activations: logits over the vocabulary for every position, 4x for the
      softmax, its gradient and the chunked recomputation, plus the target's hidden states.
    """
    target_fp32 = target_params * 4 / GIB
    target_file = target_params * 2 / GIB  # the bf16 safetensors, memory-mapped (and resident) while loading
    trainable, frozen = draft
    draft_fp32 = (trainable + frozen) * 4 / GIB
    logits = tokens * vocab * 4 / GIB
    hidden_states = tokens * hidden * (layers + 1) * 4 / GIB
    return {
        "inspect": INTERPRETER_GIB,
        "layers": INTERPRETER_GIB,
        "init": INTERPRETER_GIB + vocab * hidden * 4 / GIB + 2 * draft_fp32,
        "features": INTERPRETER_GIB + target_file + target_fp32 + logits + hidden_states,
        "bench": INTERPRETER_GIB + target_file + 1.25 * target_fp32 + draft_fp32 + logits + hidden_states,
        "train": INTERPRETER_GIB
        + target_file
        + target_fp32
        + draft_fp32
        + 12 * trainable / GIB
        + 4 * logits
        + 2 * hidden_states,
        "convert": INTERPRETER_GIB + 2 * draft_fp32,
    }


def sharded_train_budget(budget: float, target_params: int, vocab: int, hidden: int, tied: bool, ranks: int) -> float:
    """The `train` budget of one of ``ranks`` processes with `--shard-target`: the same, less the decoder layers'
    fp32 bytes that the other processes hold (the embedding and lm_head stay whole on every process)."""
    outside = vocab * hidden * (1 if tied else 2)
    layers = max(0, target_params - outside)
    return budget - layers * 4 / GIB * (1 - 1 / ranks)


def plan(
    name: str, work: Path, methods: tuple[str, ...], *, fsdp: bool, target_params: int, quick: bool = False
) -> list[Step]:
    """The steps for one target: inspect, layers, init per method, data features, train, bench, convert.

    Full: every method trains online (and the last one again from the stored features), the 2-process torchrun
    --fsdp step, bench of every trained draft, convert of EAGLE-3. Quick: init every method, then EAGLE-3 only:
    features, train from them (no full target loaded), bench and convert of that draft."""
    facts = TARGETS[name]
    target = work / name / "target"
    data = work / "data.jsonl"
    prompts = work / "prompts.jsonl"
    run = work / name
    batch_tokens = 2 * 64  # --batch-size 2 sequences of at most --max-length 64 tokens
    steps: list[Step] = []

    def budget(kind: str, method: str) -> float:
        draft = DRAFT_PARAMS.get((name, method), (0, 0))
        table = budgets(
            target_params, facts["vocab_size"], facts["hidden_size"], facts["num_hidden_layers"], draft, batch_tokens
        )
        return table[kind]

    steps.append(Step(name, "inspect", ["inspect", str(target), "--json"], budget("inspect", "")))
    steps.append(Step(name, "layers", ["layers", str(target), "-m", "all"], budget("layers", "")))
    for method in methods:
        steps.append(
            Step(
                name,
                f"init {method}",
                ["init", str(target), "--method", method, "--out", str(run / f"init-{method}")],
                budget("init", method),
            )
        )
    common = ["--target", str(target), "--data", str(data), "--max-length", "64"]
    feature_method = "eagle3" if quick else methods[-1]
    trained = () if quick else methods
    steps.append(
        Step(
            name,
            f"data features ({feature_method})",
            [
                "data",
                "features",
                *common,
                "--method",
                feature_method,
                "--out",
                str(run / "features"),
                "--batch-size",
                "2",
            ],
            budget("features", feature_method),
        )
    )
    train_common = ["--batch-size", "2", "--max-steps", "2", "--eval-fraction", "0", "--save-every", "0"]
    train_common += ["--log-every", "1", "--device", "cpu"]
    for method in trained:
        steps.append(
            Step(
                name,
                f"train {method}",
                ["train", *common, "--method", method, "--out", str(run / f"train-{method}"), *train_common],
                budget("train", method),
            )
        )
    steps.append(
        Step(
            name,
            f"train {feature_method} --features",
            [
                "train",
                "--target",
                str(target),
                "--features",
                str(run / "features"),
                "--method",
                feature_method,
                "--out",
                str(run / f"train-{feature_method}-features"),
                *train_common,
            ],
            budget("train", feature_method),
        )
    )
    if fsdp:
        fsdp_method = "eagle3"
        steps.append(
            Step(
                name,
                f"torchrun x2 train {fsdp_method} --fsdp",
                ["train", *common, "--method", fsdp_method, "--out", str(run / f"fsdp-{fsdp_method}"), *train_common]
                + ["--fsdp"],
                budget("train", fsdp_method),
                torchrun=True,
            )
        )
        sharded = sharded_train_budget(
            budget("train", fsdp_method), target_params, facts["vocab_size"], facts["hidden_size"],
            facts["tie_word_embeddings"], 2,
        )  # fmt: skip
        steps.append(
            Step(
                name,
                f"torchrun x2 train {fsdp_method} --shard-target",
                ["train", *common, "--method", fsdp_method, "--out", str(run / f"shard-{fsdp_method}"), *train_common]
                + ["--shard-target"],
                sharded,
                torchrun=True,
            )
        )
    benched = {m: run / f"train-{m}" for m in trained} or {feature_method: run / f"train-{feature_method}-features"}
    for method, draft_dir in benched.items():
        steps.append(
            Step(
                name,
                f"bench {method}",
                ["bench", "--draft", str(draft_dir), "--prompts", str(prompts), "--limit", "1"]
                + ["-n", "8", "--baselines", "target", "--device", "cpu", "--json"],
                budget("bench", method),
            )
        )
    if "eagle3" in benched:
        steps.append(
            Step(
                name,
                "convert eagle3 -> vllm",
                ["convert", str(benched["eagle3"]), "--to", "vllm", "--out", str(run / "eagle3-vllm")],
                budget("convert", "eagle3"),
            )
        )
    return steps


DRAFT_PARAMS: dict[tuple[str, str], tuple[int, int]] = {}


def check_step(step: Step) -> list[str]:
    """Problems with a finished step: a non-zero exit, or (bench) output that is not lossless."""
    problems = []
    if step.returncode != 0:
        tail = step.stderr.strip().splitlines()[-5:]
        problems.append(f"exit {step.returncode}: {' | '.join(tail)}")
    elif step.name.startswith("bench"):
        try:
            report = json.loads(step.stdout[step.stdout.index("{") :])
        except ValueError:
            problems.append("bench printed no JSON")
        else:
            if not lossless(report):
                problems.append("bench output is not lossless")
    return problems


def lossless(report) -> bool:
    """True when every `lossless` / `matches_target` flag anywhere in bench's JSON is true (and there is one)."""
    flags = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("lossless", "matches_target", "identical", "all_lossless") and isinstance(value, bool):
                    flags.append(value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(report)
    return bool(flags) and all(flags)


def table(steps: list[Step]) -> str:
    lines = [
        "| target | step | wall (s) | peak RSS (GiB) | budget (GiB) | result |",
        "|---|---|---|---|---|---|",
    ]
    for step in steps:
        result = "ok" if step.returncode == 0 else f"**exit {step.returncode}**"
        if step.over_budget:
            result += " **over budget**"
        if step.notes:
            result += " (" + "; ".join(step.notes) + ")"
        lines.append(
            f"| {step.target} | `{step.name}` | {step.seconds:.1f} | {step.peak_gib:.2f} | {step.budget_gib:.2f} | {result} |"
        )
    return "\n".join(lines)


def rehearse(
    work: Path,
    targets: list[str],
    *,
    quick: bool = False,
    fsdp: bool = True,
    timeout: float = 900,
    log=print,
) -> list[Step]:
    """Build each target under `work` and run every step; returns the steps (check each with `check_step`)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    write_jsonl(work / "data.jsonl", conversations(8))
    write_jsonl(work / "prompts.jsonl", [{"prompt": "hello there , how is it going ?"}])
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(work / "hf-home"),
        "REHEARSAL_LOGS": str(work / "logs"),
        "PYTHONUNBUFFERED": "1",
    }
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    done: list[Step] = []
    for name in targets:
        target_dir = work / name / "target"
        start = time.perf_counter()
        if (
            not (target_dir / "model.safetensors").exists()
            and not (target_dir / "model.safetensors.index.json").exists()
        ):
            shutil.rmtree(target_dir, ignore_errors=True)
            # in a child process: a fork of a process that held the model would start every later step's peak
            # RSS (wait4 counts the memory a child inherits before exec) at the model's size
            subprocess.run([sys.executable, __file__, "--build-target", name, str(target_dir)], env=env, check=True)
        params = int((target_dir / "params.txt").read_text())
        log(f"[{name}] target: {params / 1e9:.3f}B params, built in {time.perf_counter() - start:.0f} s")
        for old in (work / name).iterdir():  # outputs of an earlier rehearsal; the target is kept
            if old.name != "target":
                shutil.rmtree(old)
        methods = METHODS[name]
        # the draft sizes come from `inspect --json`, so the budgets can count them
        probe = run_step(Step(name, "inspect", ["inspect", str(target_dir), "--json"], INTERPRETER_GIB), env, timeout)
        try:
            report = json.loads(probe.stdout)
        except ValueError:
            report = {}
        for method in methods:
            DRAFT_PARAMS[(name, method)] = draft_params(report, method)
        for step in plan(name, work, methods, fsdp=fsdp and not quick, target_params=params, quick=quick):
            run_step(step, env, timeout)
            problems = check_step(step)
            step.notes.extend(problems)
            log(
                f"[{name}] {step.name}: exit {step.returncode}, {step.seconds:.1f} s, peak {step.peak_gib:.2f} GiB"
                f" (budget {step.budget_gib:.2f}){'  ' + '; '.join(problems) if problems else ''}"
            )
            done.append(step)
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="working directory (targets, runs, logs)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma list of {', '.join(TARGETS)}")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="init every method; features, train, bench, convert EAGLE-3 only; no torchrun",
    )
    parser.add_argument("--no-fsdp", action="store_true", help="skip the 2-process torchrun --fsdp step")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per step before it is killed")
    parser.add_argument("--build-target", nargs=2, metavar=("NAME", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_target:
        name, directory = args.build_target
        params = build_target(name, Path(directory))
        (Path(directory) / "params.txt").write_text(str(params))
        return 0
    if args.out is None:
        parser.error("--out DIR is required")
    names = [n for n in args.targets.split(",") if n]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; choose from {list(TARGETS)}")
    steps = rehearse(args.out, names, quick=args.quick, fsdp=not args.no_fsdp, timeout=args.timeout)
    print()
    print(table(steps))
    failed = [s for s in steps if s.returncode != 0 or any("lossless" in n for n in s.notes)]
    over = [s for s in steps if s.over_budget]
    print()
    print(f"{len(steps)} steps, {len(failed)} failed, {len(over)} over budget; logs in {args.out / 'logs'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
