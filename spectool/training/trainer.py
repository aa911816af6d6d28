"""Train a draft against its frozen target: one loop, readable top to bottom.

Per optimizer step, for each of ``grad_accum`` micro-batches: take this process's rows of the next global batch,
run the frozen target once over them (or read the stored features of ``--features``), run the method's objective,
and backpropagate. Then average the gradients over everything the step saw, clip them, and step AdamW (the draft's
trainable parameters only) under a linear-warmup + cosine learning rate.

Micro-batches are weighted by how many predictions they supervise: the step's gradient is that of
``sum_i n_i * loss_i / sum_i n_i`` over all micro-batches and processes, so the update does not depend on how the
global batch is split between processes or micro-batches (up to float rounding, and exactly the same whenever the
split leaves every part the same share of supervised positions).

A run directory (``--out``)::

    train_config.json                 the resolved configuration (what `--resume` continues)
    metrics.jsonl                     one JSON object per logged step (eval rows add eval_*)
    tensorboard/, wandb/              the same rows for TensorBoard / W&B (--report-to; spectool.training.reporting)
    checkpoints/step-0000500/         config.json + model.safetensors + spectool.json (the draft, ecosystem format,
                                      float32) and trainer_state.pt (optimizer, scheduler, RNG, data position, step)
    config.json, model.safetensors,   the final draft in the method's ecosystem format, loadable by
    spectool.json                     `spectool chat --draft OUT` (spectool.json names its target)

Checkpoints are written atomically (`spectool.checkpoint.save_draft`): a kill while writing leaves the previous
ones intact. Ctrl-C or SIGTERM finishes the current step, writes a checkpoint and stops (`TrainingInterrupted`);
a second Ctrl-C stops at once. A non-finite loss or gradient stops without writing anything (`TrainingDiverged`).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import re
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from spectool.checkpoint import DraftMetadata, check_against_target, load_draft, save_draft
from spectool.errors import SpectoolError, UsageError
from spectool.paths import (
    check_force_target,
    fsync_dir,
    make_output_dir,
    quoted,
    refuse_inputs_inside,
    remove_entries,
)
from spectool.training import precision
from spectool.training.batches import Batch, collate, pad_token_id, split_heldout
from spectool.training.config import RESUME_LOCKED, TrainConfig, default_warmup_steps
from spectool.training.distributed import (
    DistributedContext,
    DraftWithObjective,
    full_model_state,
    gradient_sync,
    init_distributed,
    is_fsdp,
    load_optimizer_state,
    optimizer_state,
    shard_batch,
    shutdown,
    unwrap,
    wrap_model,
)
from spectool.training.features import (
    FeatureStore,
    IndexedBatches,
    capture_batch,
    prepare_examples,
)
from spectool.training.reporting import Reporter, open_reporter, resolve_report_to

CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
FINAL_FILES = ("model.safetensors", "config.json", "spectool.json")
_CHECKPOINT_NAME = re.compile(r"^step-(\d{7})$")
_SIGNAL_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}

__all__ = [
    "TrainConfig",
    "TrainEvent",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "TrainingInterrupted",
    "latest_checkpoint",
    "train",
]


class TrainingInterrupted(SpectoolError):
    """Stopped by Ctrl-C (exit 130) or SIGTERM (exit 143) after saving a checkpoint."""


class TrainingDiverged(SpectoolError):
    """The loss or the gradient became NaN or infinite; nothing was saved after the last good checkpoint."""


@dataclass
class TrainEvent:
    """What the trainer reports to its caller (the command line draws progress from these).

    ``start``: ``info`` describes the run; ``step``: a step finished; ``log`` / ``eval``: ``row`` is the metrics
    row just written; ``checkpoint``: ``path`` was saved; ``done``: the final draft is in ``path``.
    ``total_steps`` is None while a --max-minutes run has not planned its length yet.
    """

    kind: Literal["start", "step", "log", "eval", "checkpoint", "done"]
    step: int
    total_steps: int | None
    row: dict[str, Any] | None = None
    path: str | None = None
    info: dict[str, Any] | None = None


@dataclass
class TrainResult:
    out: Path
    steps: int
    tokens: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)  # the last logged training row
    eval_metrics: dict[str, float] = field(default_factory=dict)  # the final evaluation (eval_*)
    resumed_from: int | None = None


def complete_checkpoints(out: str | Path) -> list[Path]:
    """The complete checkpoints under ``OUT/checkpoints`` (with their trainer_state.pt and weights), newest first."""
    found = []
    for path in (Path(out) / CHECKPOINTS_DIR).glob("step-*"):
        match = _CHECKPOINT_NAME.match(path.name)
        if match and (path / STATE_FILE).is_file() and (path / "model.safetensors").is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found, reverse=True)]


def latest_checkpoint(out: str | Path) -> Path | None:
    """The highest-step complete checkpoint under ``OUT/checkpoints`` (one with its trainer_state.pt), or None."""
    found = complete_checkpoints(out)
    return found[0] if found else None


#: What a trainer_state.pt must hold (see `Trainer.save_checkpoint`).
STATE_KEYS = ("step", "tokens", "seconds", "total_steps", "optimizer", "scheduler", "rng", "data", "config")


def read_trainer_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer state, read without running any code from the file (``weights_only=True``: tensors,
    numbers, strings and containers only; a pickle that asks for anything else is refused with one line)."""
    file = path / STATE_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # a crafted or corrupt pickle raises anything; nothing of it runs
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            reason = "it holds objects other than tensors and plain values, which spectool never writes"
        raise SpectoolError(f"{file}: unreadable trainer state ({reason[:200]})") from None
    if not isinstance(state, dict):
        raise SpectoolError(f"{file}: unreadable trainer state (not a dictionary)")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise SpectoolError(f"{file}: trainer state lacks {', '.join(missing)}; resume from another checkpoint")
    return state


@dataclass
class ResumePoint:
    """The checkpoint a resumed run continues from, its trainer state, and warnings about newer ones skipped."""

    path: Path
    state: dict[str, Any]
    skipped: list[str]


def find_resume_point(out: Path) -> ResumePoint:
    """The newest checkpoint that reads back whole (trainer state, weights, config); newer unreadable ones are
    skipped with a warning, so a corrupt latest checkpoint falls back to the one before it."""
    from safetensors import safe_open

    candidates = complete_checkpoints(out)
    if not candidates:
        raise UsageError(f"nothing to resume in {out}: no complete checkpoint under {out / CHECKPOINTS_DIR}")
    skipped: list[str] = []
    for path in candidates:
        try:
            state = read_trainer_state(path)
            try:
                # Opening checks the header against the file's length (a lost tail is found); the tensors are read
                # once, when the draft loads.
                with safe_open(str(path / "model.safetensors"), framework="pt"):
                    pass
                json.loads((path / "config.json").read_text(encoding="utf-8"))
            except Exception as exc:  # truncated or garbled weights / config
                raise SpectoolError(f"{path}: unreadable draft ({str(exc).splitlines()[0][:200]})") from None
        except SpectoolError as exc:
            skipped.append(str(exc))
            continue
        if skipped:
            skipped = [f"{reason}; resuming from the previous checkpoint, {path.name}" for reason in skipped]
        return ResumePoint(path, state, skipped)
    raise SpectoolError(f"no readable checkpoint in {out / CHECKPOINTS_DIR}: " + " | ".join(skipped))


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS_DIR / f"step-{step:07d}"


def check_output(out: Path, *, resume: bool, force: bool, inputs: dict[str, str | None]) -> ResumePoint | list[Path]:
    """Check the run directory before anything loads; nothing is removed here.

    A resume needs a readable checkpoint in OUT (returned). A fresh run needs OUT empty, or ``force`` and only
    spectool's own run files in it (returned: what to remove once every other check has passed). OUT may never
    be, nor contain, one of the run's ``inputs`` (the target, data, --init, features).
    """
    refuse_inputs_inside(out, inputs)
    if resume:
        return find_resume_point(out)
    remove = check_force_target(out, force=force, hint="continue its run with --resume")
    make_output_dir(out)
    return remove


@dataclass
class CosineSchedule:
    """The lr multiplier after ``step`` optimizer steps: linear warmup to 1, then cosine down to min_lr_ratio at
    ``total_steps``. A callable object, so LambdaLR saves it (``total_steps`` with it) in the scheduler state;
    a ``--max-minutes`` run moves ``total_steps`` as it re-plans."""

    total_steps: int
    warmup_steps: int
    min_lr_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


#: A --max-minutes run plans its step count from the speed of its first steps (its default warmup) and re-plans
#: at every log row.
PLAN_AFTER_STEPS = 10


def planned_steps(step: int, seconds: float, budget_seconds: float, cap: int | None) -> int:
    """Steps that fit ``budget_seconds`` at the speed so far (``seconds`` for ``step`` steps), at most ``cap``;
    never fewer than ``step`` (the run then ends now)."""
    per_step = seconds / max(1, step)
    total = step + max(0, math.floor((budget_seconds - seconds) / per_step)) if per_step > 0 else step
    return min(total, cap) if cap is not None else total


class Trainer:
    """One training run; ``Trainer(config).run()`` trains and writes the final draft (see the module docstring).

    Construction does the setup: the process group (under torchrun), the run directory, the target, the data,
    the draft (fresh, ``--init``, or the latest checkpoint with ``resume=True``), the objective, the optimizer.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: bool = False,
        force: bool = False,
        callback: Callable[[TrainEvent], None] | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.callback = callback
        self.out = Path(config.out).expanduser()
        self.context: DistributedContext = init_distributed(config.device)
        self.device = self.context.device
        self.notes: list[str] = []
        self._stop_signal: int | None = None  # the signal this process received
        self._stop_all = False  # some process received one (agreed at every step)
        try:
            self._setup(resume, force)
        except BaseException:
            self.close(clean=False)
            raise

    # ------------------------------------------------------------------------------------------------------
    # Setup
    # ------------------------------------------------------------------------------------------------------

    def _setup(self, resume: bool, force: bool) -> None:
        config, context = self.config, self.context
        if config.batch_size % context.world_size:
            raise UsageError(
                f"--batch-size {config.batch_size} is the global micro-batch; it must divide evenly over "
                f"{context.world_size} processes"
            )
        inputs = {"--target": config.target}  # a resumed run writes its final draft into OUT
        if not resume:  # a fresh one may also remove what --force replaces
            inputs.update({"--data": config.data, "--init": config.init, "--features": config.features})
        self._resume_state: dict[str, Any] | None = None
        self._to_remove: list[Path] = []

        def check() -> tuple[Path | None, list[str]]:
            checked = check_output(self.out, resume=resume, force=force, inputs=inputs)
            if isinstance(checked, ResumePoint):
                self._resume_state = checked.state  # rank 0 keeps it; the others read their own copy
                return checked.path, checked.skipped
            self._to_remove = checked
            return None, []

        resume_from, skipped = self._agree(check)
        self.notes.extend(skipped)
        self.resume_from: Path | None = resume_from
        self.autocast_dtype = precision.draft_autocast_dtype(self.device, self.config.dtype)
        torch.manual_seed(config.seed)
        random.seed(config.seed)

        examples = self._load_target_and_examples()
        config = self.config  # --max-length may have been capped to the target's positions
        self.train_examples, self.eval_examples = split_heldout(examples, config.eval_fraction, seed=config.seed)
        if not self.train_examples:
            raise SpectoolError("no training examples left after holding out --eval-fraction; lower it")
        # Positions of the split's examples among all examples (the feature store's indices).
        index_of = {id(example): index for index, example in enumerate(examples)}
        self.train_index = [index_of[id(example)] for example in self.train_examples]
        self.eval_index = [index_of[id(example)] for example in self.eval_examples]

        self.draft, self.spec = self._build_draft()
        self.objective = self._make_objective()
        self.target = None
        if self.store is None:
            from spectool.target import FrozenTarget

            self.target = FrozenTarget(self.target_model, self.objective.target_layer_ids)
        elif self.store.target_layer_ids != self.objective.target_layer_ids:
            raise UsageError(
                f"{self.store.directory} holds features of layers {self.store.target_layer_ids}, the draft reads "
                f"{self.objective.target_layer_ids}; train with --target-layer-ids matching the features"
            )
        self.model = wrap_model(DraftWithObjective(self.draft, self.objective), context, fsdp=config.fsdp)
        self.optimizer = self._make_optimizer()
        self.batches = IndexedBatches(
            self.train_examples,
            config.batch_size,
            self.pad_id,
            seed=config.seed,
            batches_per_step=config.grad_accum,
        )
        self.total_steps, self.warmup_steps, self.scheduler = self._make_schedule()
        self.generator = torch.Generator(self.device).manual_seed(config.seed * 1_000_003 + context.rank)
        self.step, self.tokens, self.seconds = 0, 0, 0.0
        self.resolved_config = replace(
            config,
            target=self.info.ref if config.target is None else config.target,
            lr=config.peak_lr,
            warmup_steps=self.warmup_steps,
            target_layer_ids=list(self.spec.target_layer_ids),
            num_draft_layers=self.spec.num_draft_layers if config.method != "eagle3" else None,
            block_size=self.spec.block_size,
            mask_token_id=self.spec.mask_token_id,
            draft_vocab_size=self.spec.draft_vocab_size,
            markov_rank=self.spec.markov_rank,
            report_to=",".join(resolve_report_to(config.report_to)) or "none",
        )
        self.reporter: Reporter | None = None
        self.finish_only = False  # a resumed run whose steps are all done but whose final draft is not
        if resume_from is not None:
            self._load_trainer_state(resume_from)
        elif context.is_main:
            # Every check passed and everything loaded: only now replace what --force said to replace.
            remove_entries(self._to_remove)
            _write_json(self.out / CONFIG_FILE, self.resolved_config.to_json())

    def _load_target_and_examples(self) -> list[Any]:
        """The target (the frozen model online; with stored features only its lm_head and embeddings) and the
        tokenized examples."""
        from spectool.hub import load_model_and_tokenizer, resolve_model

        config = self.config
        self.store = FeatureStore(config.features) if config.features else None
        self.info = resolve_model(config.target or (self.store.manifest["target"] if self.store else None))
        self.target_dtype = target_dtype = precision.target_dtype(self.device, config.dtype)
        limit = self.info.arch.max_position_embeddings
        if self.store is None and limit and config.max_length > limit:
            self.notes.append(
                f"--max-length {config.max_length} is more than the target's {limit} positions "
                f"(max_position_embeddings): examples are cut at {limit} tokens"
            )
            self.config = config = replace(config, max_length=limit)
        if self.store is None:
            self.target_model, tokenizer = load_model_and_tokenizer(
                self.info, dtype=target_dtype, device=str(self.device)
            )
            self.target_lm_head = self.target_model.get_output_embeddings()
            self.target_embed = self.target_model.get_input_embeddings()
            prepared = prepare_examples(config, tokenizer)
            examples, self.pad_id = prepared.examples, pad_token_id(tokenizer)
            self.data_report = {
                "rows_read": prepared.load_report.rows_read,
                "rows_skipped": prepared.load_report.rows_skipped + prepared.tokenize_report.rows_skipped,
                "skip_reasons": prepared.load_report.reasons + prepared.tokenize_report.reasons,
                "truncated": prepared.tokenize_report.truncated,
                "dropped_unsupervised": prepared.tokenize_report.dropped_unsupervised,
            }
        else:
            self.target_model = None
            self.target_lm_head, self.target_embed = self._target_heads(target_dtype)
            examples, self.pad_id = self.store.examples, int(self.store.manifest["pad_token_id"])
            self.data_report = {"features": str(self.store.directory)}
        return examples

    def _make_schedule(self) -> tuple[int, int, torch.optim.lr_scheduler.LambdaLR]:
        """(total steps, warmup steps, scheduler): max_steps or epochs over the training split, whichever ends
        first (one epoch when none of max_steps, epochs, max_minutes is given). With max_minutes those are caps
        (``step_cap``) and the total is planned after PLAN_AFTER_STEPS steps; until then it is the cap, or
        unknown (a placeholder past the planning step)."""
        config = self.config
        steps_per_epoch = math.ceil(len(self.batches) / config.grad_accum)
        limits = [config.max_steps] if config.max_steps else []
        if config.epochs or not (limits or config.max_minutes):
            limits.append(max(1, math.ceil((config.epochs or 1.0) * steps_per_epoch)))
        self.step_cap: int | None = min(limits) if limits else None
        self.length_known = not config.max_minutes or self.step_cap is not None
        if config.max_minutes:
            total = self.step_cap if self.step_cap is not None else PLAN_AFTER_STEPS + 1
            default_warmup = min(PLAN_AFTER_STEPS, default_warmup_steps(self.step_cap or PLAN_AFTER_STEPS * 10))
        else:
            total = self.step_cap
            default_warmup = default_warmup_steps(total)
        warmup = config.warmup_steps if config.warmup_steps is not None else default_warmup
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, CosineSchedule(total, warmup, config.min_lr_ratio)
        )
        return total, warmup, scheduler

    def _agree(self, action: Callable[[], Any]) -> Any:
        """Run ``action`` on rank 0 and share its result, or its error, with every process."""
        outcome: tuple[Any, BaseException | None] = (None, None)
        if self.context.is_main:
            try:
                outcome = (action(), None)
            except SpectoolError as exc:
                outcome = (None, exc)
        result, error = self.context.broadcast_object(outcome)
        if error is not None:
            raise error
        return result

    def _target_heads(self, dtype: str) -> tuple[nn.Module, nn.Module]:
        """The target's lm_head and input embedding alone, read from its weights (training from features)."""
        from spectool.hub import read_target_weights

        weights = read_target_weights(self.info)
        embed = nn.Embedding.from_pretrained(weights["embed_tokens"].to(getattr(torch, dtype)), freeze=True)
        head_weight = weights["lm_head"].to(getattr(torch, dtype))
        head = nn.Linear(head_weight.shape[1], head_weight.shape[0], bias=False)
        head.weight = nn.Parameter(head_weight, requires_grad=False)
        return head.to(self.device), embed.to(self.device)

    def _build_draft(self) -> tuple[nn.Module, Any]:
        """The draft to train (fresh, from --init, or from the checkpoint to resume) and its resolved spec."""
        from spectool.init import new_draft

        config = self.config
        ids = config.target_layer_ids
        if ids is None and self.store is not None and self.store.target_layer_ids:
            ids = self.store.target_layer_ids
        source = self.resume_from or (Path(config.init).expanduser() if config.init else None)
        if source is not None:
            loaded = load_draft(source, dtype=torch.float32)
            if loaded.method != config.method:
                raise UsageError(f"{source} holds a {loaded.method} draft, not {config.method}")
            fit_warnings = check_against_target(loaded, self.info.arch, self.info.tokenizer_length)
            if self.resume_from is None:
                self.notes.extend(fit_warnings + loaded.notes)
            draft = loaded.model
            cfg = draft.config
            ids = loaded.target_layer_ids or None
            spec = self._resolve(
                target_layer_ids=ids if config.method != "eagle1" else None,
                num_feature_layers=len(ids) if ids and config.method in ("dflash", "dspark") else None,
                num_draft_layers=cfg.num_hidden_layers,
                block_size=getattr(cfg, "block_size", None),
                mask_token_id=getattr(cfg, "mask_token_id", None),
                draft_vocab_size=getattr(cfg, "draft_vocab_size", None),
                markov_rank=getattr(cfg, "markov_rank", None),
            )
        else:
            spec = self._resolve(
                num_feature_layers=config.num_feature_layers,
                num_draft_layers=config.num_draft_layers,
                target_layer_ids=ids if config.method != "eagle1" else None,
                block_size=config.block_size,
                mask_token_id=config.mask_token_id,
                draft_vocab_size=config.draft_vocab_size,
                markov_rank=config.markov_rank,
            )
            draft = new_draft(self.info, spec, seed=config.seed)
        if self.resume_from is None and getattr(draft, "pruned_vocab", False):
            if source is None or not bool(draft.d2t.any()):  # d2t all zero: the placeholder `spectool init` writes
                self._build_draft_vocab(draft)
        draft.to(self.device)
        draft.freeze_target_copies()
        draft.train()
        return draft, spec

    def _resolve(self, **options: Any) -> Any:
        """`spectool.registry.resolve` for this target; layer-id warnings become notes (given ids only)."""
        from spectool.layers import LayerIdWarning
        from spectool.registry import resolve

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LayerIdWarning)
            spec = resolve(self.config.method, self.info.arch, tokenizer_length=self.info.tokenizer_length, **options)
        for warning in caught:
            if not issubclass(warning.category, LayerIdWarning):
                warnings.warn(warning.message, warning.category, stacklevel=2)
            elif self.config.target_layer_ids is not None and self.resume_from is None:
                self.notes.append(str(warning.message))
        return spec

    def _build_draft_vocab(self, draft: nn.Module) -> None:
        """EAGLE-3 with a pruned vocabulary: keep the most frequent supervised tokens of the training split."""
        from spectool.training.objectives.eagle3 import build_draft_vocab, count_supervised_tokens

        counts = count_supervised_tokens(self.train_examples, draft.config.vocab_size)
        draft.set_vocab_mapping(build_draft_vocab(counts, draft.config.draft_vocab_size))
        if not draft.owns_embeddings:
            draft.init_lm_head_from_target(self.target_lm_head.weight.detach().float().cpu())
        kept = int(counts[draft.draft_to_target(torch.arange(draft.config.draft_vocab_size))].sum())
        share = kept / max(1, int(counts.sum()))
        self.notes.append(
            f"draft vocabulary: the {draft.config.draft_vocab_size} most frequent supervised tokens "
            f"({share:.1%} of the supervised tokens)"
        )

    def _make_objective(self) -> Any:
        from spectool.training.objectives import make_objective

        return make_objective(self.config.method, self.draft, **self.config.objective_hparams())

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW (torch's default betas) over the draft's trainable parameters; no weight decay on norms and
        biases."""
        trainable = set(self.draft.trainable_parameter_names())
        decay, no_decay = [], []
        for name, param in self.draft.named_parameters():
            if name in trainable and param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        groups = [
            {"params": decay, "weight_decay": self.config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=self.config.peak_lr)

    # ------------------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train to ``total_steps``, evaluating, logging and checkpointing on the way; write the final draft."""
        clean = False
        try:
            with self._signals():
                result = self._run()
            clean = True
            return result
        except (TrainingInterrupted, TrainingDiverged):
            clean = True  # every process stopped at the same step, after the same collectives
            raise
        finally:
            if self.reporter is not None:
                self.reporter.close()
                self.reporter = None
            self.close(clean=clean)

    def close(self, *, clean: bool = True) -> None:
        """Leave the process group (see `distributed.shutdown`); the DDP wrapper is dropped before it."""

        def drop_wrapper() -> None:
            model = getattr(self, "model", None)
            if model is not None and not is_fsdp(model):
                self.model = unwrap(model)

        shutdown(self.context, clean=clean, release=drop_wrapper)

    def _run(self) -> TrainResult:
        config = self.config
        resumed_from = self.step if self.resume_from is not None else None
        if self.context.is_main:  # TensorBoard / W&B get the rows of metrics.jsonl (--report-to)
            hparams = {**self.resolved_config.to_json(), "total_steps": self.total_steps}
            self.reporter = open_reporter(self.resolved_config.report_to, self.out, hparams, start_step=self.step)
        self._emit("start", info=self.describe())
        window = _Window()
        last_row: dict[str, Any] = {}
        eval_row: dict[str, Any] = {}
        idle = 0  # steps in a row without a supervised prediction
        if self.finish_only:  # the steps were all done before a kill: evaluate (and calibrate) as the run would have
            last_row = _last_metrics_row(self.out / METRICS_FILE, self.step)
            eval_row = self.evaluate() if self.eval_examples else {}
        while self.step < self.total_steps:
            stats = self.train_step()
            self.step += 1
            idle = idle + 1 if not stats["supervised"] else 0
            if idle >= min(math.ceil(len(self.batches) / config.grad_accum), self.total_steps):
                raise SpectoolError(
                    f"{idle} steps in a row had nothing to learn: no example supervises a single "
                    f"{config.method} prediction (answers too short, or no assistant tokens within --max-length); "
                    "nothing was saved. Check the data and --max-length"
                )
            self.tokens += int(stats["tokens"])
            self.seconds += stats["seconds"]
            window.add(stats)
            if (
                config.max_minutes
                and self.step >= PLAN_AFTER_STEPS
                and (self.step == PLAN_AFTER_STEPS or self.step % config.log_every == 0)
            ):
                self._plan()
            self._emit("step")
            due_eval = bool(self.eval_examples) and config.eval_every and self.step % config.eval_every == 0
            final = self.step == self.total_steps
            if final or due_eval or self.step % config.log_every == 0:
                row = window.row(self.step, self.scheduler.get_last_lr()[0], self.batches, self.tokens)
                if (due_eval or final) and self.eval_examples:
                    eval_row = self.evaluate()
                    row.update(eval_row)
                last_row = row
                window = _Window()
                self._log(row)
            stop = not final and self._stop_requested()
            if (config.save_every and self.step % config.save_every == 0) or stop or (final and config.save_every):
                path = self.save_checkpoint()
                if stop:
                    received = self._stop_signal or signal.SIGTERM  # another process got it: torchrun stops us all
                    raise TrainingInterrupted(
                        f"interrupted by {signal.Signals(received).name} at step {self.step} of {self.total_steps}; "
                        f"saved {path}. Continue with: spectool train --out {quoted(self.out)} --resume",
                        exit_code=_SIGNAL_EXIT_CODES.get(received, 130),
                    )
        self._calibrate_confidence()
        path = self.save_final(last_row, eval_row)
        self._emit("done", path=str(path))
        metrics = {k: v for k, v in last_row.items() if not k.startswith("eval_")}
        return TrainResult(self.out, self.step, self.tokens, self.seconds, metrics, eval_row, resumed_from)

    def _calibrate_confidence(self) -> None:
        """DSpark: fit the prefix scheduler's confidence temperatures (`calibrate_temperatures`) on the last
        held-out evaluation (every process's share of it) and store them in the draft's config."""
        data = getattr(self, "calibration_data", None)
        if not data:  # the same on every process: DSpark with a confidence head, after an evaluation
            return
        from spectool.decoding.schedule import calibrate_temperatures

        local = tuple(torch.cat(parts) for parts in zip(*data, strict=True))
        shares = self.context.all_gather_object(local)
        logits, hits, supervised = (torch.cat(parts) for parts in zip(*shares, strict=True))
        self.calibration_blocks = int(logits.shape[0])
        self.draft.config.confidence_temperatures = self._agree(
            lambda: calibrate_temperatures(logits, hits, supervised)
        )

    def _plan(self) -> None:
        """Re-plan ``total_steps`` for the --max-minutes budget from the speed so far (rank 0 decides)."""
        budget = self.config.max_minutes * 60.0
        total = self._agree(lambda: planned_steps(self.step, self.seconds, budget, self.step_cap))
        self.total_steps, self.length_known = total, True
        for schedule in self.scheduler.lr_lambdas:
            schedule.total_steps = total

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the step's (all-process) statistics."""
        config, model = self.config, self.model
        started = self._now()
        target_seconds = 0.0
        local: dict[str, float] = {"supervised": 0.0, "loss_sum": 0.0, "nonfinite": 0.0, "tokens": 0.0}
        metric_sums: dict[str, float] = {}
        for micro in range(config.grad_accum):
            batch, indices, tokens = self._next_batch()
            t0 = self._now()
            target_batch = self._target_features(batch, indices)
            target_seconds += self._now() - t0
            with gradient_sync(model, micro == config.grad_accum - 1):
                with self._autocast():
                    loss = model(target_batch, **self._objective_kwargs(batch, self.generator))
                output = unwrap(model).last_output
                (loss * output.num_supervised).backward()
            n = float(output.num_supervised)
            local["supervised"] += n
            local["loss_sum"] += float(loss.detach()) * n
            local["nonfinite"] += 0.0 if math.isfinite(float(loss.detach())) else 1.0
            local["tokens"] += tokens
            for key, value in output.metrics.items():
                if key != "loss":
                    metric_sums[key] = metric_sums.get(key, 0.0) + value * n
        totals = self._reduce({**local, "stop": 1.0 if self._stop_signal else 0.0, **metric_sums})
        self._stop_all = totals["stop"] > 0
        if totals["nonfinite"]:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(self._diverged_message("the loss"))
        supervised = totals["supervised"]
        # Undo the per-process averaging of DDP / FSDP and divide by the step's supervised count.
        scale = self.context.world_size / supervised if supervised else 0.0
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.mul_(scale)
        grad_norm = self._clip_gradients()
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(self._diverged_message("the gradient norm"))
        if supervised:
            self.optimizer.step()
        with warnings.catch_warnings():  # a first step with nothing to learn skips optimizer.step() on purpose
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = self._now() - started
        metrics = {key: totals[key] / supervised for key in metric_sums} if supervised else {}
        return {
            "loss_sum": totals["loss_sum"],
            "supervised": supervised,
            "tokens": totals["tokens"],
            "metric_sums": {key: totals[key] for key in metric_sums},
            "metrics": metrics,
            "grad_norm": grad_norm,
            "seconds": seconds,
            "target_seconds": target_seconds,
        }

    def _next_batch(self) -> tuple[Batch, list[int], int]:
        """This process's rows of the next global batch, the example indices of those rows, and the tokens of the
        global batch to count here (rank 0 counts them, so the sum over processes is the batch's)."""
        batch = next(self.batches)
        tokens = int(batch.attention_mask.sum()) if self.context.is_main else 0
        indices = [self.train_index[i] for i in self.batches.last_indices]
        if self.context.enabled:
            missing = -len(indices) % self.context.world_size
            indices = (indices + indices[:1] * missing)[self.context.rows(len(indices) + missing)]
            batch = shard_batch(batch, self.context)
        return batch.to(self.device), indices, tokens

    def _target_features(self, batch: Batch, indices: list[int]) -> Any:
        needs_logits = bool(self.objective.needs_target_logits)
        if self.store is not None:
            head = self.target_lm_head if needs_logits else None
            features = self.store.target_batch(indices, batch, lm_head=head, device=self.device)
        else:
            features = capture_batch(self.target, batch, return_logits=needs_logits)
        if self.autocast_dtype is None:  # an fp32 draft reads a bf16 target's features (no autocast to mix them)
            features = features.to(self.device, torch.float32)
        return features

    def _objective_kwargs(self, batch: Batch, generator: torch.Generator) -> dict[str, Any]:
        return {
            "target_lm_head": self.target_lm_head,
            "target_embed": self.target_embed,
            "generator": generator,
            "position_ids": batch.position_ids,
            "document_ids": batch.document_ids,
        }

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _clip_gradients(self) -> float:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
            norm = norm.full_tensor()
        return float(norm)

    def _reduce(self, values: dict[str, float]) -> dict[str, float]:
        """Sums over all processes (one all-reduce); the keys must be the same everywhere."""
        if not self.context.enabled:
            return dict(values)
        keys = sorted(values)
        tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        self.context.all_reduce_sum(tensor)
        return dict(zip(keys, tensor.tolist(), strict=True))

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _diverged_message(self, what: str) -> str:
        last = latest_checkpoint(self.out)
        kept = (
            f"the last good checkpoint is {last} (continue from it with --resume and a lower --lr)"
            if last
            else ("no checkpoint was written yet (lower --lr, or check the data)")
        )
        return f"{what} became NaN or infinite at step {self.step + 1}; stopped without saving: {kept}"

    # ------------------------------------------------------------------------------------------------------
    # Evaluation
    # ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and metrics on the held-out split (``eval_``-prefixed), averaged over supervised predictions.

        The objective's randomness (anchors) comes from a generator seeded the same way at every evaluation, so
        evaluations are comparable across steps.
        """
        config = self.config
        model = self.model if is_fsdp(self.model) else unwrap(self.model)
        generator = torch.Generator(self.device).manual_seed(config.seed + 7919 + self.context.rank)
        unwrap(self.model).train(False)
        sums: dict[str, float] = {"supervised": 0.0, "loss_sum": 0.0}
        self.calibration_data: list[tuple[torch.Tensor, ...]] = []
        try:
            size = config.batch_size
            starts = range(0, len(self.eval_examples), size)
            if config.eval_batches is not None:
                starts = starts[: config.eval_batches]
            for start in starts:
                chunk = self.eval_examples[start : start + size]
                indices = self.eval_index[start : start + len(chunk)]
                batch = collate(chunk, self.pad_id)
                if self.context.enabled:
                    missing = -len(indices) % self.context.world_size
                    indices = (indices + indices[:1] * missing)[self.context.rows(len(indices) + missing)]
                    batch = shard_batch(batch, self.context)
                batch = batch.to(self.device)
                target_batch = self._target_features(batch, indices)
                with self._autocast():
                    loss = model(target_batch, **self._objective_kwargs(batch, generator))
                output = unwrap(self.model).last_output
                if output.calibration is not None:
                    self.calibration_data.append(tuple(t.cpu() for t in output.calibration))
                n = float(output.num_supervised)
                sums["supervised"] += n
                sums["loss_sum"] += float(loss) * n
                for key, value in output.metrics.items():
                    if key != "loss":
                        sums[key] = sums.get(key, 0.0) + value * n
        finally:
            unwrap(self.model).train(True)
        totals = self._reduce(sums)
        supervised = totals.pop("supervised")
        loss_sum = totals.pop("loss_sum")
        if not supervised:
            return {}
        row = {"eval_loss": loss_sum / supervised}
        row.update({f"eval_{key}": value / supervised for key, value in totals.items()})
        return row

    # ------------------------------------------------------------------------------------------------------
    # Logging
    # ------------------------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What the run is about to do (the ``start`` event)."""
        frozen = set(self.draft.frozen_parameter_names())
        trainable = sum(p.numel() for n, p in self.draft.named_parameters() if n not in frozen)
        return {
            "method": self.config.method,
            "target": self.info.ref,
            "draft_class": type(unwrap(self.model).draft).__name__.removeprefix("FSDP"),
            "target_layer_ids": list(self.spec.target_layer_ids),
            "trainable_params": trainable,
            "train_examples": len(self.train_examples),
            "eval_examples": len(self.eval_examples),
            "total_steps": self.total_steps if self.length_known else None,
            "max_minutes": self.config.max_minutes,
            "step_cap": self.step_cap,
            "start_step": self.step,
            "warmup_steps": self.warmup_steps,
            "lr": self.config.peak_lr,
            "global_batch": self.config.batch_size * self.config.grad_accum,
            "world_size": self.context.world_size,
            "device": str(self.device),
            "target_dtype": self.store.manifest.get("feature_dtype") if self.store is not None else self.target_dtype,
            "draft_dtype": "bfloat16 autocast" if self.autocast_dtype is not None else "float32",
            "mode": "features" if self.store is not None else "online",
            "data": self.data_report,
            "notes": list(self.notes),
        }

    def _log(self, row: dict[str, Any]) -> None:
        if self.context.is_main:
            with open(self.out / METRICS_FILE, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
            if self.reporter is not None:
                self.reporter.log(row)
        self._emit("log", row=row)

    def _emit(self, kind: str, **fields: Any) -> None:
        if self.callback is not None and self.context.is_main:
            total = self.total_steps if self.length_known else None
            self.callback(TrainEvent(kind, self.step, total, **fields))  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------------

    def _export_draft(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """A CPU draft holding ``state`` (FSDP keeps only shards on each process), else the draft itself."""
        if not is_fsdp(self.model):
            return self.draft
        replica = type(self.draft)(self.draft.config)
        replica.load_state_dict(state, strict=True)
        return replica

    def _metadata(self, training: dict[str, Any]) -> DraftMetadata:
        from spectool.init import target_metadata

        metadata = target_metadata(self.info, self.spec)
        metadata.target_layer_ids = list(self.spec.target_layer_ids)
        metadata.training = training
        return metadata

    def _training_summary(self, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        summary = {
            "steps": self.step,
            "total_steps": self.total_steps,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "data": self.config.data,
            "features": self.config.features,
            "global_batch": self.config.batch_size * self.config.grad_accum,
            "lr": self.config.peak_lr,
            "seed": self.config.seed,
        }
        if metrics:
            summary["final_metrics"] = metrics
        if getattr(self, "calibration_blocks", None):
            summary["confidence_calibration_blocks"] = self.calibration_blocks  # held-out blocks behind the fit
        return summary

    def _check_weights_finite(self) -> None:
        """Refuse to save NaN or infinite weights (a far too high --lr can make them in one step, before any loss
        shows it); every process checks its own parameters (shards under FSDP)."""
        broken = 0.0
        for param in self.model.parameters():
            if param.requires_grad:
                local = param.to_local() if hasattr(param, "to_local") else param
                if not bool(torch.isfinite(local.detach()).all()):
                    broken = 1.0
                    break
        if self._reduce({"broken": broken})["broken"]:
            last = latest_checkpoint(self.out)
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
            raise TrainingDiverged(
                f"the draft's weights became NaN or infinite by step {self.step}; nothing was saved ({kept}): "
                "lower --lr"
            )

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-<7-digit step>`` atomically (every process must call this), keep the last k."""
        self._check_weights_finite()
        state = full_model_state(self.model) if is_fsdp(self.model) else {}
        optim = optimizer_state(self.model, self.optimizer)
        rng = self.context.all_gather_object(self._rng_state())
        path = checkpoint_dir(self.out, self.step)

        def write() -> Path:
            trainer_state = {
                "step": self.step,
                "tokens": self.tokens,
                "seconds": self.seconds,
                "total_steps": self.total_steps,
                "optimizer": optim,
                "scheduler": self.scheduler.state_dict(),
                "rng": rng,
                "data": self.batches.state_dict(),
                "config": self.resolved_config.to_json(),
                "world_size": self.context.world_size,
            }
            buffer = io.BytesIO()
            torch.save(trainer_state, buffer)
            save_draft(
                self._export_draft(state),
                path,
                method=self.config.method,
                metadata=self._metadata(self._training_summary()),
                dtype=torch.float32,
                extra_files={STATE_FILE: buffer.getvalue()},
            )
            self._prune_checkpoints()
            _fsync_file(self.out / METRICS_FILE)  # the rows up to this checkpoint survive a power cut with it
            return path

        self._agree(lambda: _wrap_os_errors(write, path))
        self.context.barrier()
        self._emit("checkpoint", path=str(path))
        return path

    def _prune_checkpoints(self) -> None:
        """Keep the newest ``keep_last`` checkpoints; remove temporary directories left by killed saves."""
        root = self.out / CHECKPOINTS_DIR
        steps = sorted(p for p in root.glob("step-*") if _CHECKPOINT_NAME.match(p.name))
        for old in steps[: -self.config.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".step-*.tmp-*"):
            if not stale.name.endswith(f".tmp-{os.getpid()}"):
                shutil.rmtree(stale, ignore_errors=True)

    def _rng_state(self) -> dict[str, Any]:
        state = {
            "python": random.getstate(),
            "torch": torch.get_rng_state(),
            "generator": self.generator.get_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _load_trainer_state(self, path: Path) -> None:
        """Restore optimizer, scheduler, RNG, data position and counters from a checkpoint (weights were loaded
        with the draft)."""
        state = self._resume_state if self._resume_state is not None else read_trainer_state(path)
        self._resume_state = None
        saved = state["config"]
        now = self.resolved_config.to_json()
        changed = [name for name in RESUME_LOCKED if saved.get(name) != now.get(name)]
        if changed:
            detail = "; ".join(f"{n}: saved {saved.get(n)!r}, now {now.get(n)!r}" for n in changed)
            raise UsageError(f"{path} was trained with other settings ({detail}); resume with the saved ones")
        load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["data"])
        self.step, self.tokens, self.seconds = int(state["step"]), int(state["tokens"]), float(state["seconds"])
        rng = state["rng"]
        if len(rng) == self.context.world_size:
            mine = rng[self.context.rank]
            random.setstate(mine["python"])
            torch.set_rng_state(mine["torch"])
            self.generator.set_state(mine["generator"])
            if "cuda" in mine and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(mine["cuda"])
        else:
            self.generator.manual_seed(self.config.seed * 1_000_003 + self.context.rank + self.step)
            self.notes.append(
                f"resumed on {self.context.world_size} processes from a run on {len(rng)}: the data continues exactly, "
                "the objective's random draws do not"
            )
        if self.config.max_minutes:
            self._plan()  # the budget counts the time already spent
        if self.step >= self.total_steps:
            if final_draft_steps(self.out) == self.step:
                raise UsageError(
                    f"the run in {self.out} already finished ({self.step} of {self.total_steps} steps); raise "
                    "--max-steps, --epochs or --max-minutes to train longer"
                )
            # Stopped after its last checkpoint but before (or while) writing the final draft: write it now.
            self.finish_only = True
            self.notes.append(f"all {self.step} steps were done; writing the final draft the run did not finish")
        # The lr of the next step from the current schedule (a resumed run may change --lr or its length).
        schedule = CosineSchedule(self.total_steps, self.warmup_steps, self.config.min_lr_ratio)
        self.scheduler.base_lrs = [self.config.peak_lr] * len(self.optimizer.param_groups)
        self.scheduler.lr_lambdas = [schedule] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.config.peak_lr
            group["lr"] = self.config.peak_lr * schedule(self.step)
        if self.context.is_main:
            _truncate_metrics(self.out / METRICS_FILE, self.step)
            _write_json(self.out / CONFIG_FILE, self.resolved_config.to_json())

    def save_final(self, metrics: dict[str, Any], eval_metrics: dict[str, Any]) -> Path:
        """The trained draft in OUT itself (ecosystem format + spectool.json with a ``training`` summary)."""
        self._check_weights_finite()
        state = full_model_state(self.model) if is_fsdp(self.model) else {}
        final_metrics = {k: v for k, v in {**metrics, **eval_metrics}.items() if isinstance(v, (int, float))}

        def write() -> Path:
            staging = self.out / ".final-draft"
            shutil.rmtree(staging, ignore_errors=True)
            save_draft(
                self._export_draft(state),
                staging,
                method=self.config.method,
                metadata=self._metadata(self._training_summary(final_metrics)),
                dtype=getattr(torch, self.config.save_dtype),
            )
            # spectool.json goes first and comes back last, so a kill in between leaves a draft that --resume
            # sees as unfinished (and writes again); weights, then config.json: each rename is atomic.
            (self.out / FINAL_FILES[-1]).unlink(missing_ok=True)
            fsync_dir(self.out)
            for name in FINAL_FILES:
                os.replace(staging / name, self.out / name)
            fsync_dir(self.out)
            shutil.rmtree(staging, ignore_errors=True)
            return self.out

        self._agree(lambda: _wrap_os_errors(write, self.out))
        self.context.barrier()
        return self.out

    # ------------------------------------------------------------------------------------------------------
    # Signals
    # ------------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """Ctrl-C / SIGTERM ask for a checkpoint and a stop after the current step; a second Ctrl-C stops at once
        (one process only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, _frame: Any) -> None:
            if self._stop_signal is None:
                self._stop_signal = signum
                # One process: a second Ctrl-C stops at once. Under torchrun the launcher forwards the terminal's
                # Ctrl-C once more and escalates by itself, so repeated signals are ignored there.
                if not self.context.enabled:
                    signal.signal(signal.SIGINT, signal.default_int_handler)

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop_requested(self) -> bool:
        """Whether to stop: a signal here, or (with several processes) in any process as of the step's all-reduce,
        so that every process decides alike."""
        return self._stop_all if self.context.enabled else self._stop_signal is not None


class _Window:
    """Sums over the steps since the last log row."""

    def __init__(self) -> None:
        self.steps = 0
        self.loss_sum = self.supervised = self.tokens = self.seconds = self.target_seconds = 0.0
        self.metric_sums: dict[str, float] = {}
        self.grad_norm = 0.0

    def add(self, stats: dict[str, Any]) -> None:
        self.steps += 1
        self.loss_sum += stats["loss_sum"]
        self.supervised += stats["supervised"]
        self.tokens += stats["tokens"]
        self.seconds += stats["seconds"]
        self.target_seconds += stats["target_seconds"]
        self.grad_norm = stats["grad_norm"]
        for key, value in stats["metric_sums"].items():
            self.metric_sums[key] = self.metric_sums.get(key, 0.0) + value

    def row(self, step: int, lr: float, batches: IndexedBatches, tokens_total: int) -> dict[str, Any]:
        supervised = self.supervised
        row: dict[str, Any] = {
            "step": step,
            "epoch": round(batches.epoch + batches.position / len(batches.examples), 4),
            "loss": self.loss_sum / supervised if supervised else None,
        }
        row.update({key: value / supervised for key, value in sorted(self.metric_sums.items()) if supervised})
        row.update(
            {
                "lr": lr,
                "grad_norm": self.grad_norm,
                "tokens": tokens_total,
                "supervised": int(self.supervised),
                "tokens_per_second": self.tokens / self.seconds if self.seconds else 0.0,
                "step_seconds": self.seconds / max(1, self.steps),
                "target_forward_fraction": self.target_seconds / self.seconds if self.seconds else 0.0,
            }
        )
        return row


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    _fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    if path.is_file():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def final_draft_steps(out: Path) -> int | None:
    """The step count recorded by a whole final draft in ``out`` (all of FINAL_FILES), or None."""
    if not all((out / name).is_file() for name in FINAL_FILES):
        return None
    try:
        steps = json.loads((out / FINAL_FILES[-1]).read_text(encoding="utf-8"))["training"]["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return steps if isinstance(steps, int) else None


def _last_metrics_row(path: Path, step: int) -> dict[str, Any]:
    """The training metrics logged at ``step`` (without eval_*), or {}."""
    row: dict[str, Any] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict) and data.get("step") == step:
                row = {k: v for k, v in data.items() if not k.startswith("eval_")}
    return row


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after ``step`` (a resumed run logs them again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue  # a line cut off by a kill
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _wrap_os_errors(write: Callable[[], Path], path: Path) -> Path:
    try:
        return write()
    except OSError as exc:
        raise SpectoolError(f"cannot write {path}: {exc.strerror or exc}") from None


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    force: bool = False,
    callback: Callable[[TrainEvent], None] | None = None,
) -> TrainResult:
    """Train a draft as ``config`` says (see `Trainer`)."""
    return Trainer(config, resume=resume, force=force, callback=callback).run()
