"""Build spectool's embedded tiny chat target from scratch: corpus, tokenizer, model, training, export.

    python examples/tiny_target/build.py --threads 1 --minutes 75

Stages (each logged to stdout):

1. corpus     chat Q/A pairs from Python's own documentation (``chat_corpus.py``); ``train.jsonl`` and
              ``heldout.jsonl`` (~5% of questions, by hash) go to ``--work-dir``.
2. tokenizer  byte-level BPE, 4080 tokens including ``<|endoftext|>`` (0), ``<|im_start|>``, ``<|im_end|>``
              (``chat_tokenizer.py``), trained on the train split only.
3. model      ``Qwen3ForCausalLM``: 8 layers, hidden 256, vocab_size 4096 (rows 4080.. unused), ~7.3M params.
4. train      plain PyTorch loop, loss on assistant tokens (answer + ``<|im_end|>``), conversations packed
              into 256-token rows with per-conversation position ids (so no token attends across
              conversations), AdamW, warmup then cosine to 10%, checkpoints every ``--checkpoint-minutes``.
5. export     bf16 HF model directory at ``--out`` (also at every checkpoint), then greedy samples for
              five training and five held-out questions, written into the model card.

Schedule and determinism: the LR follows ``step / horizon``. The horizon starts at ``--max-steps``; with a
``--minutes`` budget it is re-planned (only ever shortened) from the measured seconds per step, once after
the first steps and again at each checkpoint, so the LR reaches its floor when the time runs out. Every
horizon change is logged and stored in the checkpoint and the model card as ``--horizons``. Initialisation
and data order depend only on ``--seed`` and the step, so a run is bit-for-bit reproducible given the seed,
``--threads`` (CPU reductions change with the thread count) and the horizon plan: rerun with
``--minutes 0 --horizons <plan>``. ``--resume`` continues from the last checkpoint with the same result as
an uninterrupted run.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import chat_corpus  # noqa: E402
import chat_tokenizer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "spectool" / "assets" / "tiny-qwen3"
DEFAULT_WORK_DIR = Path("/tmp/tiny_target_work")
MODEL_VOCAB_SIZE = 4096
MAX_EXPORT_BYTES = 16 * 1024 * 1024
IGNORE = -100


def log(message: str) -> None:
    """Print one line to stdout immediately (the log is read while the run goes on)."""
    print(message, flush=True)


# --------------------------------------------------------------------------------------------------------
# Options


@dataclass
class Options:
    """Everything that shapes the build; stored in the checkpoint so ``--resume`` can check it."""

    work_dir: Path = DEFAULT_WORK_DIR
    out: Path = DEFAULT_OUT
    seed: int = 0
    threads: int = 1
    minutes: float = 75.0
    max_steps: int | None = None
    horizons: list[tuple[int, int]] | None = None
    stop_after_steps: int | None = None
    resume: bool = False
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 20
    checkpoint_minutes: float = 5.0
    device: str = "cpu"
    source_code: bool = False
    keep_best: bool = False
    command: str = ""


def parse_args(argv: list[str] | None = None) -> Options:
    """Command-line options (see ``--help``)."""
    parser = argparse.ArgumentParser(
        description="Build the embedded tiny Qwen3 chat target: corpus, tokenizer, training, bf16 export.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="corpus, tokenizer, checkpoint")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="exported HF model directory")
    parser.add_argument("--seed", type=int, default=0, help="seeds model init and data order")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    parser.add_argument("--minutes", type=float, default=75.0, help="wall-time budget for training; 0 = none")
    parser.add_argument("--max-steps", type=int, default=None, help="schedule horizon (required if --minutes 0)")
    parser.add_argument(
        "--horizons",
        default=None,
        help="fixed horizon plan 'STEP:HORIZON,...' from an earlier run's card, to reproduce it exactly",
    )
    parser.add_argument("--stop-after-steps", type=int, default=None, help="stop early (for tests of --resume)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --work-dir")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument(
        "--keep-best",
        action="store_true",
        help="export the checkpoint with the lowest held-out loss instead of the last one",
    )
    parser.add_argument(
        "--source-code",
        action="store_true",
        help="add the standard library's functions as source-code answers (~5x the corpus; see chat_corpus.py)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way; results differ between devices)")
    args = parser.parse_args(argv)
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA device; use --device cpu")
    horizons = None
    if args.horizons:
        horizons = [tuple(int(x) for x in part.split(":")) for part in args.horizons.split(",")]
        if not horizons or horizons[0][0] != 0:
            parser.error("--horizons must start with '0:HORIZON'")
    elif args.minutes <= 0 and args.max_steps is None:
        parser.error("give --max-steps (or --horizons) when there is no --minutes budget")
    command = "python examples/tiny_target/build.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    values = {k: v for k, v in vars(args).items() if k != "horizons"}
    return Options(**values, horizons=horizons, command=command.strip())


# --------------------------------------------------------------------------------------------------------
# Stage 1 and 2: corpus and tokenizer


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as JSON lines atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def build_corpus(work_dir: Path, source_code: bool = False) -> tuple[list[dict], list[dict], str]:
    """Train and held-out conversations (also written to ``work_dir``) and a hash of both."""
    train, heldout = chat_corpus.corpus("train", source_code), chat_corpus.corpus("heldout", source_code)
    write_jsonl(work_dir / "train.jsonl", train)
    write_jsonl(work_dir / "heldout.jsonl", heldout)
    digest = hashlib.sha256(json.dumps([train, heldout], ensure_ascii=False).encode()).hexdigest()[:16]
    chars = sum(len(m["content"]) for c in train + heldout for m in c["messages"])
    log(f"[corpus] {len(train)} train + {len(heldout)} held-out conversations, {chars:,} chars, sha {digest}")
    return train, heldout, digest


def build_tokenizer(train: list[dict], work_dir: Path):
    """Train the BPE on the rendered train conversations, save it to ``work_dir/tokenizer``, return it."""
    texts = [chat_tokenizer.render_chat(c["messages"]) for c in train]
    hf_tokenizer = chat_tokenizer.to_transformers(chat_tokenizer.train_bpe(texts))
    chat_tokenizer.check_round_trip(hf_tokenizer, chat_tokenizer.ROUND_TRIP_SAMPLES + tuple(texts[:500]))
    chat_tokenizer.save(hf_tokenizer, work_dir / "tokenizer")
    digest = hashlib.sha256((work_dir / "tokenizer" / "tokenizer.json").read_bytes()).hexdigest()[:16]
    log(f"[tokenizer] len(tokenizer) = {len(hf_tokenizer)}, round trip exact, sha {digest}")
    return hf_tokenizer


# --------------------------------------------------------------------------------------------------------
# Training data: tokenised conversations packed into fixed-length rows


@dataclass
class Encoded:
    """One tokenised conversation; ``labels`` is ``IGNORE`` outside the answer and its ``<|im_end|>``."""

    input_ids: list[int]
    labels: list[int]


def encode_conversation(tokenizer, conversation: dict) -> Encoded:
    """Tokenise prompt and answer separately, exactly as the prompt is tokenised at generation time."""
    user, assistant = conversation["messages"]
    prompt = chat_tokenizer.render_chat([user], add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(assistant["content"] + chat_tokenizer.IM_END, add_special_tokens=False)
    newline_ids = tokenizer.encode("\n", add_special_tokens=False)
    input_ids = prompt_ids + answer_ids + newline_ids
    labels = [IGNORE] * len(prompt_ids) + answer_ids + [IGNORE] * len(newline_ids)
    return Encoded(input_ids, labels)


@dataclass
class PackedRows:
    """Fixed-length rows of whole conversations; position ids restart at 0 for each conversation."""

    input_ids: torch.Tensor  # (rows, seq_len) int64, padded with 0
    position_ids: torch.Tensor  # (rows, seq_len)
    labels: torch.Tensor  # (rows, seq_len), IGNORE on prompts and padding


def pack(encoded: list[Encoded], seq_len: int, seed: int) -> tuple[PackedRows, int]:
    """First-fit packing in a seeded order; returns the rows and how many conversations were too long."""
    order = list(range(len(encoded)))
    random.Random(seed).shuffle(order)
    bins: list[list[Encoded]] = []
    room: list[int] = []
    too_long = 0
    for index in order:
        item = encoded[index]
        if len(item.input_ids) > seq_len:
            too_long += 1
            continue
        for b, free in enumerate(room):
            if free >= len(item.input_ids):
                bins[b].append(item)
                room[b] -= len(item.input_ids)
                break
        else:
            bins.append([item])
            room.append(seq_len - len(item.input_ids))
    input_ids = torch.zeros(len(bins), seq_len, dtype=torch.long)
    position_ids = torch.zeros(len(bins), seq_len, dtype=torch.long)
    labels = torch.full((len(bins), seq_len), IGNORE, dtype=torch.long)
    for row, items in enumerate(bins):
        start = 0
        for item in items:
            n = len(item.input_ids)
            input_ids[row, start : start + n] = torch.tensor(item.input_ids)
            labels[row, start : start + n] = torch.tensor(item.labels)
            position_ids[row, start : start + n] = torch.arange(n)
            start += n
        position_ids[row, start:] = torch.arange(seq_len - start)  # padding is its own segment
    return PackedRows(input_ids, position_ids, labels), too_long


def batch_rows(step: int, n_rows: int, batch_size: int, seed: int) -> torch.Tensor:
    """Row indices of the batch for ``step``: a fresh seeded permutation per epoch, a pure function of step."""
    first = step * batch_size
    indices = []
    for i in range(first, first + batch_size):
        epoch, offset = divmod(i, n_rows)
        permutation = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        indices.append(int(permutation[offset]))
    return torch.tensor(indices)


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --------------------------------------------------------------------------------------------------------
# Stage 3: model


def build_model(tokenizer, seed: int):
    """A seeded, freshly initialised ``Qwen3ForCausalLM`` (~7.3M parameters, fp32)."""
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    eos_id = tokenizer.convert_tokens_to_ids(chat_tokenizer.IM_END)
    config = Qwen3Config(
        vocab_size=MODEL_VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=eos_id, pad_token_id=0, do_sample=False)
    return model


def count_parameters(model) -> int:
    """Unique parameters (the tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------------
# Stage 4: training


@dataclass
class TrainState:
    """What a checkpoint holds besides model and optimizer tensors."""

    step: int = 0
    elapsed_s: float = 0.0
    horizons: list[tuple[int, int]] = field(default_factory=list)
    last_loss: float = float("nan")
    heldout_loss: float = float("nan")
    train_eval_loss: float = float("nan")
    best_heldout_loss: float = float("inf")  # with --keep-best: the exported weights' held-out loss and step
    best_step: int = -1


def horizon_at(step: int, horizons: list[tuple[int, int]]) -> int:
    """The schedule horizon in force at ``step`` (the last plan entry starting at or before it)."""
    current = horizons[0][1]
    for start, horizon in horizons:
        if start <= step:
            current = horizon
    return current


def lr_at(step: int, horizon: int, opts: Options) -> float:
    """Linear warmup, then cosine from ``--lr`` to ``--min-lr-ratio * --lr`` at ``horizon``.

    A horizon too short for the warmup (smoke tests) shrinks the warmup to a fifth of the horizon.
    """
    warmup = min(opts.warmup_steps, max(1, horizon // 5))
    if step < warmup:
        return opts.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, horizon - warmup))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return opts.lr * (opts.min_lr_ratio + (1.0 - opts.min_lr_ratio) * cosine)


def make_optimizer(model, opts: Options) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=opts.lr, betas=(0.9, 0.95), eps=1e-8)


def loss_on(model, input_ids, position_ids, labels) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over labelled positions, and how many there were."""
    device = model.lm_head.weight.device
    input_ids, position_ids, labels = input_ids.to(device), position_ids.to(device), labels.to(device)
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    targets = labels[:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    count = int((targets != IGNORE).sum())
    return loss / max(1, count), count


@torch.no_grad()
def evaluate(model, rows: PackedRows, batch_size: int) -> float:
    """Token-weighted mean loss over all rows."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, rows.input_ids.size(0), batch_size):
        sl = slice(start, start + batch_size)
        loss, n = loss_on(model, rows.input_ids[sl], rows.position_ids[sl], rows.labels[sl])
        total += float(loss) * n
        count += n
    model.train()
    return total / max(1, count)


def subset(rows: PackedRows, count: int) -> PackedRows:
    """The first ``count`` rows (the packing order is already shuffled)."""
    return PackedRows(rows.input_ids[:count], rows.position_ids[:count], rows.labels[:count])


def save_checkpoint(
    path: Path, model, optimizer, state: TrainState, opts: Options, fingerprint: dict, best: dict | None = None
) -> None:
    """Write model, optimizer, progress and RNG states (and ``--keep-best``'s best weights) atomically."""
    payload = {
        "model": model.state_dict(),
        "best_model": best,
        "optimizer": optimizer.state_dict(),
        "state": asdict(state),
        "fingerprint": fingerprint,
        "options": {k: str(v) for k, v in asdict(opts).items()},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "python_rng": random.getstate(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model, optimizer, fingerprint: dict) -> tuple[TrainState, dict | None]:
    """Restore a checkpoint written by :func:`save_checkpoint` (state and best weights); refuse one from a
    different setup."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload["fingerprint"] != fingerprint:
        raise SystemExit(
            f"checkpoint {path} was made with {payload['fingerprint']}, this run is {fingerprint}; "
            "use the same options or a fresh --work-dir"
        )
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["torch_rng"])
    if payload.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["cuda_rng"])
    random.setstate(payload["python_rng"])
    state = payload["state"]
    state["horizons"] = [tuple(h) for h in state["horizons"]]
    return TrainState(**state), payload.get("best_model")


def replan(state: TrainState, opts: Options, seconds_per_step: float) -> None:
    """Shorten the horizon so the remaining steps fit the ``--minutes`` budget (never lengthen it)."""
    if opts.minutes <= 0 or opts.horizons is not None:
        return
    remaining_s = opts.minutes * 60 - state.elapsed_s
    fits = state.step + int(0.97 * remaining_s / seconds_per_step)
    current = horizon_at(state.step, state.horizons)
    if fits < current:
        new = max(state.step + 1, fits)
        state.horizons.append((state.step, new))
        log(f"[schedule] {seconds_per_step:.3f} s/step: horizon {current} -> {new} (plan {plan_text(state)})")


def plan_text(state: TrainState) -> str:
    """The horizon plan as the ``--horizons`` value that reproduces it."""
    return ",".join(f"{start}:{horizon}" for start, horizon in state.horizons)


def train(model, tokenizer, train_rows, eval_sets, opts: Options, fingerprint: dict, card_info: dict):
    """The training loop; returns the final :class:`TrainState`.

    With ``--keep-best`` the model leaves with the weights of the lowest held-out loss, which is also what every
    export wrote.
    """
    checkpoint_path = opts.work_dir / "checkpoint.pt"
    optimizer = make_optimizer(model, opts)
    best: dict | None = None
    if opts.resume:
        if not checkpoint_path.exists():
            raise SystemExit(f"--resume: no checkpoint at {checkpoint_path}")
        state, best = load_checkpoint(checkpoint_path, model, optimizer, fingerprint)
        log(f"[train] resumed at step {state.step} ({state.elapsed_s / 60:.1f} min done), plan {plan_text(state)}")
    else:
        # Without --max-steps, start from an optimistic 1 s/step guess; the re-plan after 40 steps (still in
        # warmup, so before the guess could touch the LR) shortens it to what the budget really allows.
        initial = opts.max_steps if opts.max_steps is not None else max(1, int(opts.minutes * 60))
        first = opts.horizons or [(0, initial)]
        state = TrainState(horizons=list(first))
    if opts.horizons is not None:
        state.horizons = list(opts.horizons)

    n_rows = train_rows.input_ids.size(0)
    tokens_per_step = opts.batch_size * opts.seq_len
    budget_s = opts.minutes * 60 if opts.minutes > 0 else math.inf
    start_time = time.perf_counter()
    elapsed_before = state.elapsed_s
    last_checkpoint = start_time
    window_start, window_step = None, state.step
    losses: list[float] = []
    log_time, log_step = time.perf_counter(), state.step
    planned_after_warmup = False
    model.train()

    def checkpoint_and_export(final: bool) -> None:
        nonlocal best
        state.heldout_loss = evaluate(model, eval_sets["heldout"], opts.batch_size)
        state.train_eval_loss = evaluate(model, eval_sets["train"], opts.batch_size)
        improved = state.heldout_loss < state.best_heldout_loss
        if opts.keep_best and improved:
            state.best_heldout_loss, state.best_step = state.heldout_loss, state.step
            best = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        save_checkpoint(checkpoint_path, model, optimizer, state, opts, fingerprint, best)
        exported = not opts.keep_best or improved
        if exported:
            export(model, tokenizer, opts, state, card_info, samples=None, final=final)
        log(
            f"[checkpoint] step {state.step}: held-out loss {state.heldout_loss:.3f}, train-subset loss "
            f"{state.train_eval_loss:.3f}; saved {checkpoint_path.name}"
            + (f" and exported to {opts.out}" if exported else f" (best stays step {state.best_step})")
        )

    while True:
        state.elapsed_s = elapsed_before + time.perf_counter() - start_time
        horizon = horizon_at(state.step, state.horizons)
        if state.step >= horizon or state.elapsed_s >= budget_s:
            break
        if opts.stop_after_steps is not None and state.step >= opts.stop_after_steps:
            break
        lr = lr_at(state.step, horizon, opts)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = batch_rows(state.step, n_rows, opts.batch_size, opts.seed)
        loss, _ = loss_on(model, train_rows.input_ids[rows], train_rows.position_ids[rows], train_rows.labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
        optimizer.step()
        state.step += 1
        state.last_loss = loss.item()
        losses.append(state.last_loss)

        now = time.perf_counter()
        if state.step % opts.log_every == 0:
            rate = (state.step - log_step) * tokens_per_step / (now - log_time)
            log(
                f"step {state.step:6d}/{horizon} | loss {sum(losses) / len(losses):.4f} | lr {lr:.2e} | "
                f"{rate:,.0f} tok/s | {(now - log_time) / (state.step - log_step):.3f} s/step | "
                f"{(elapsed_before + now - start_time) / 60:.1f} min"
            )
            losses, log_time, log_step = [], now, state.step
        # Measure speed from step 5 on (the first steps are slow) and plan the horizon once after 40 steps.
        if window_start is None and state.step - window_step >= 5:
            window_start, window_step = now, state.step
        if not planned_after_warmup and window_start is not None and state.step - window_step >= 35:
            planned_after_warmup = True
            state.elapsed_s = elapsed_before + now - start_time
            replan(state, opts, (now - window_start) / (state.step - window_step))
        if now - last_checkpoint >= opts.checkpoint_minutes * 60:
            state.elapsed_s = elapsed_before + now - start_time
            if window_start is not None and state.step > window_step:  # re-plan from the recent speed
                replan(state, opts, (now - window_start) / (state.step - window_step))
            checkpoint_and_export(final=False)
            last_checkpoint = time.perf_counter()
            if planned_after_warmup:
                window_start, window_step = last_checkpoint, state.step

    state.elapsed_s = elapsed_before + time.perf_counter() - start_time
    log(f"[train] stopped at step {state.step} after {state.elapsed_s / 60:.1f} min; plan {plan_text(state)}")
    checkpoint_and_export(final=not stopped_early(state, opts))
    if opts.keep_best and best is not None:
        model.load_state_dict(best)
    return state


def stopped_early(state: TrainState, opts: Options) -> bool:
    """True when ``--stop-after-steps`` ended the run before its schedule did (``--resume`` continues it)."""
    return opts.stop_after_steps is not None and state.step < horizon_at(state.step, state.horizons)


# --------------------------------------------------------------------------------------------------------
# Stage 5: export and samples


def write_atomically(directory: Path, files: dict[str, Path]) -> None:
    """Move each finished file into ``directory`` with ``os.replace`` (readers never see half a file)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        os.replace(source, directory / name)


def export(model, tokenizer, opts: Options, state: TrainState, card_info: dict, samples, final: bool) -> None:
    """Write the bf16 HF model directory (config, weights, tokenizer, generation config, model card)."""
    out = opts.out.resolve()
    staging = out.parent / f".{out.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    bf16 = copy.deepcopy(model).to("cpu", torch.bfloat16)
    bf16.config.architectures = ["Qwen3ForCausalLM"]
    bf16.save_pretrained(str(staging))
    chat_tokenizer.save(tokenizer, staging)
    weights = staging / "model.safetensors"
    if weights.stat().st_size > MAX_EXPORT_BYTES:
        raise SystemExit(f"model.safetensors is {weights.stat().st_size:,} bytes, over the 16 MB limit")
    (staging / "README.md").write_text(model_card(opts, state, card_info, samples, final))
    files = {p.name: p for p in staging.iterdir() if p.is_file()}
    for path in files.values():
        path.chmod(0o644)  # safetensors are written private; the directory ships in the package
    write_atomically(out, files)
    shutil.rmtree(staging, ignore_errors=True)


def sample_questions(train: list[dict], heldout: list[dict], count: int = 5) -> list[tuple[str, str]]:
    """A fixed choice of ``count`` training and ``count`` held-out questions, tagged with their split."""
    rng = random.Random(0)
    picked = [("train", c) for c in rng.sample(train, count)] + [("held-out", c) for c in rng.sample(heldout, count)]
    return [(split, c["messages"][0]["content"]) for split, c in picked]


@torch.no_grad()
def greedy_samples(out: Path, questions: list[tuple[str, str]], max_new_tokens: int = 80) -> list[dict]:
    """Load the exported directory with the Auto classes and answer each question greedily."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    results = []
    for split, question in questions:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        generated = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)
        answer = tokenizer.decode(generated[0, prompt["input_ids"].size(1) :], skip_special_tokens=True)
        results.append({"split": split, "question": question, "answer": answer})
    return results


def device_words(opts: Options) -> str:
    """Where the training ran, for the model card."""
    if opts.device == "cpu":
        return f"{opts.threads} CPU thread(s)"
    return torch.cuda.get_device_name(torch.device(opts.device))


def model_card(opts: Options, state: TrainState, info: dict, samples, final: bool) -> str:
    """The exported directory's README.md."""
    status = "final export" if final else f"intermediate snapshot at step {state.step} (training still running)"
    lines = [
        "# tiny-qwen3: spectool's embedded chat target",
        "",
        "An 8-layer Qwen3 (`Qwen3ForCausalLM`) trained from scratch to answer questions about Python",
        "from Python's own documentation. It exists so spectool's tests, examples and demos have a real,",
        "offline chat target whose drafts can be trained and benchmarked in minutes. It is far too small",
        "to be a useful assistant.",
        "",
        f"Status: {status}.",
        "",
        "## Facts",
        "",
        "| | |",
        "|---|---|",
        "| architecture | Qwen3ForCausalLM: 8 layers, hidden 256, intermediate 768, 4 heads / 2 KV heads, "
        "head_dim 64, tied embeddings |",
        f"| parameters | {info['params']:,} |",
        f"| vocab_size / len(tokenizer) | {MODEL_VOCAB_SIZE} / {info['tokenizer_length']} "
        f"(row {info['tokenizer_length']} is the spare DFlash/DSpark mask token) |",
        "| tokenizer | byte-level BPE; `<|endoftext|>` = 0 (pad), `<|im_start|>` = 1, `<|im_end|>` = 2 (eos) |",
        "| chat template | ChatML, no system prompt, no thinking blocks |",
        "| weights | bfloat16 safetensors (trained in fp32) |",
        f"| corpus | {info['train_conversations']:,} train / {info['heldout_conversations']:,} held-out "
        f"conversations, {info['train_tokens']:,} train tokens; pydoc help topics and docstrings of "
        f"{len(chat_corpus.STDLIB_MODULES)} standard-library modules"
        f"{' and the source of its functions' if opts.source_code else ''} (CPython {info['python']}) |",
        f"| training | {state.step} steps of {opts.batch_size} x {opts.seq_len} tokens, "
        f"{state.elapsed_s / 60:.1f} min on {device_words(opts)}, loss on assistant tokens only |",
        f"| optimiser | AdamW lr {opts.lr:g} (betas 0.9/0.95, wd {opts.weight_decay:g}), warmup "
        f"{opts.warmup_steps}, cosine to {opts.min_lr_ratio:g}x; horizon plan `{plan_text(state)}` |",
        *(
            [
                f"| exported weights | step {state.best_step}: the lowest held-out loss of the run "
                f"({state.best_heldout_loss:.3f}; `--keep-best`) |"
            ]
            if opts.keep_best and state.best_step >= 0
            else []
        ),
        f"| final loss | train batch {state.last_loss:.3f}, train subset {state.train_eval_loss:.3f}, "
        f"held-out {state.heldout_loss:.3f} |",
        "",
        "## How it was built",
        "",
        "```",
        opts.command,
        "```",
        "",
        f"Exact reproduction (same seed, threads and schedule): add `--minutes 0 --horizons {plan_text(state)}`.",
        "The held-out questions (about 5%, chosen by a hash of the question) are in `heldout.jsonl` in the",
        "work dir, or `chat_corpus.corpus('heldout')` in `examples/tiny_target/`.",
    ]
    if samples:
        lines += ["", "## Greedy samples (max_new_tokens=80)", ""]
        for sample in samples:
            lines += [f"**{sample['split']}**: {sample['question']}", "", "```", sample["answer"], "```", ""]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run every stage; see the module docstring."""
    opts = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the log one line per event
    torch.set_num_threads(opts.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    if opts.device != "cpu":  # cuBLAS needs a fixed workspace to be deterministic
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # On CUDA an op without a deterministic kernel warns instead of stopping the build.
    torch.use_deterministic_algorithms(True, warn_only=opts.device != "cpu")
    opts.work_dir.mkdir(parents=True, exist_ok=True)
    log(f"[build] {opts.command}")
    log(f"[build] torch {torch.__version__}, {torch.get_num_threads()} thread(s), work dir {opts.work_dir}")

    train_convs, heldout_convs, corpus_sha = build_corpus(opts.work_dir, opts.source_code)
    tokenizer = build_tokenizer(train_convs, opts.work_dir)

    encoded = [encode_conversation(tokenizer, c) for c in train_convs]
    encoded_heldout = [encode_conversation(tokenizer, c) for c in heldout_convs]
    answer_tokens = [sum(label != IGNORE for label in e.labels) for e in encoded]
    train_tokens = sum(len(e.input_ids) for e in encoded)
    log(
        f"[corpus] train: {train_tokens:,} tokens ({sum(answer_tokens):,} answer tokens); held-out: "
        f"{sum(len(e.input_ids) for e in encoded_heldout):,} tokens; answer tokens p10/p50/p90/max "
        f"{percentile(answer_tokens, 0.1)}/{percentile(answer_tokens, 0.5)}/{percentile(answer_tokens, 0.9)}/"
        f"{max(answer_tokens)}"
    )
    train_rows, too_long = pack(encoded, opts.seq_len, opts.seed)
    heldout_rows, _ = pack(encoded_heldout, opts.seq_len, opts.seed)
    fill = float((train_rows.labels != IGNORE).sum()) / train_rows.labels.numel()
    used = sum(len(e.input_ids) for e in encoded if len(e.input_ids) <= opts.seq_len) / train_rows.labels.numel()
    log(
        f"[data] {train_rows.input_ids.size(0)} rows of {opts.seq_len} ({used:.0%} filled, {fill:.0%} labelled); "
        f"{too_long} conversations longer than {opts.seq_len} tokens dropped"
    )

    model = build_model(tokenizer, opts.seed).to(opts.device)
    params = count_parameters(model)
    log(f"[model] Qwen3ForCausalLM, {params:,} parameters, vocab_size {MODEL_VOCAB_SIZE}")

    fingerprint = {
        "corpus": corpus_sha,
        "seed": opts.seed,
        "batch_size": opts.batch_size,
        "seq_len": opts.seq_len,
        "threads": opts.threads,
        "device": opts.device,
    }
    card_info = {
        "params": params,
        "tokenizer_length": len(tokenizer),
        "train_conversations": len(train_convs),
        "heldout_conversations": len(heldout_convs),
        "train_tokens": train_tokens,
        "python": ".".join(map(str, sys.version_info[:3])),
    }
    eval_sets = {"heldout": heldout_rows, "train": subset(train_rows, heldout_rows.input_ids.size(0))}
    state = train(model, tokenizer, train_rows, eval_sets, opts, fingerprint, card_info)

    samples = greedy_samples(opts.out.resolve(), sample_questions(train_convs, heldout_convs))
    for sample in samples:
        log(f"[sample] ({sample['split']}) Q: {sample['question']}\n[sample] A: {sample['answer']!r}")
    export(model, tokenizer, opts, state, card_info, samples, final=not stopped_early(state, opts))
    size = (opts.out / "model.safetensors").stat().st_size
    log(f"[export] {opts.out}: model.safetensors {size / 1e6:.1f} MB; model card with samples written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
