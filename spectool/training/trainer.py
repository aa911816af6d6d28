"""Train a draft against its frozen target: one loop, readable top to bottom.

Per optimizer step, for each of ``grad_accum`` micro-batches: take this process's rows of the next global batch,
run the frozen target once over them (or read the stored features of ``--features``), run the method's objective,
and backpropagate. Then average the gradients over everything the step saw, clip them, and step AdamW (the draft's
trainable parameters only) under a linear-warmup + cosine learning rate (`spectool.training.optimization`).

Micro-batches are weighted by how many predictions they supervise: the step's gradient is that of
``sum_i n_i * loss_i / sum_i n_i`` over all micro-batches and processes, so the update does not depend on how the
global batch is split between processes or micro-batches (up to float rounding, and exactly the same whenever the
split leaves every part the same share of supervised positions).

What the run reads comes from `spectool.training.inputs` (target, examples) and `spectool.training.draft_setup`
(the draft); what it writes goes through `spectool.training.rundir` (checkpoints, metrics.jsonl, the final draft),
and the state a checkpoint saves and a resume puts back is `spectool.training.run_state`'s (`RunCheckpoints`).
Ctrl-C or SIGTERM finishes the current step, writes a checkpoint and stops (`TrainingInterrupted`); a second Ctrl-C
stops at once. A non-finite loss or gradient stops without writing anything (`TrainingDiverged`).
"""

from __future__ import annotations

import math
import random
import re
import signal
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from spectool import hardware
from spectool.checkpoint import DraftMetadata
from spectool.drafts.from_target import target_metadata
from spectool.errors import SpectoolError, UsageError
from spectool.paths import quoted, remove_entries
from spectool.registry import get
from spectool.training import rundir
from spectool.training.config import TrainConfig
from spectool.training.distributed import (
    DistributedContext,
    DraftWithObjective,
    gradient_sync,
    init_distributed,
    is_fsdp,
    shutdown,
    unwrap,
    wrap_model,
)
from spectool.training.draft_setup import resolved_config, setup_draft
from spectool.training.evaluation import calibrate_confidence, evaluate
from spectool.training.features import IndexedBatches
from spectool.training.feed import TrainingFeed
from spectool.training.inputs import frozen_target, load_inputs, share_target_copies, split_examples
from spectool.training.optimization import (
    make_optimizer,
    make_scheduler,
    plan_due,
    plan_schedule,
    planned_steps,
    restart_schedule,
    set_total_steps,
)
from spectool.training.progress import MetricsWindow, TrainEvent, TrainingDiverged, TrainingInterrupted, TrainResult
from spectool.training.reporting import Reporter, open_reporter
from spectool.training.run_state import RunCheckpoints, RunCounters, TrainingParts
from spectool.training.signals import EXIT_CODES, StopRequests


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
        self.created = self._now()  # --max-minutes counts loading too
        self.notes: list[str] = []
        self.stop_requests = StopRequests(several_processes=self.context.enabled)
        try:
            self._setup(resume, force)
        except BaseException:
            self.close(clean=False)
            raise

    # --- Setup ----------------------------------------------------------------------------------------------

    def _setup(self, resume: bool, force: bool) -> None:
        config, context = self.config, self.context
        if config.batch_size % context.world_size:
            raise UsageError(
                f"--batch-size {config.batch_size} is the global micro-batch; it must divide evenly over "
                f"{context.world_size} processes"
            )
        self.checked = rundir.check_run_directory(config, context, resume=resume, force=force)
        self.notes.extend(self.checked.skipped)
        self.resume_from: Path | None = self.checked.resume_from
        self.autocast_dtype = hardware.draft_autocast_dtype(self.device, config.dtype)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self._load_inputs()
        self._set_up_draft()
        self.batches = IndexedBatches(
            self.train_examples,
            self.config.batch_size,
            self.inputs.pad_id,
            seed=self.config.seed,
            batches_per_step=self.config.grad_accum,
        )
        self.feed = TrainingFeed(
            self.inputs,
            self.split,
            self.batches,
            self.target,
            needs_target_logits=bool(self.objective.needs_target_logits),
            context=context,
            autocast_dtype=self.autocast_dtype,
        )
        self._set_up_schedule()
        self.checkpoints = RunCheckpoints(self.out, context, method=config.method, keep_last=config.keep_last)
        if self.resume_from is not None:
            self._resume(self.resume_from)
        elif context.is_main:
            # Every check passed and everything loaded: only now replace what --force said to replace.
            remove_entries(self.checked.to_remove)
            rundir.write_config(self.out, self.resolved_config.to_json())

    def _load_inputs(self) -> None:
        """The target and the examples (`spectool.training.inputs`), split into training and held-out rows."""
        self.inputs = inputs = load_inputs(self.config, self.device, self.context)
        # --max-length may have been capped to the target's positions
        self.config, self.info, self.store = inputs.config, inputs.info, inputs.store
        self.target_model, self.target_lm_head = inputs.target_model, inputs.target_lm_head
        self.notes.extend(inputs.notes)
        self.split = split_examples(inputs.examples, self.config.eval_fraction, seed=self.config.seed)
        self.train_examples, self.eval_examples = self.split.train, self.split.held_out

    def _set_up_draft(self) -> None:
        """The draft (`draft_setup`), its objective, the target's part in it, the (wrapped) model, the optimizer."""
        config = self.config
        prepared = setup_draft(
            config,
            self.info,
            resume_from=self.resume_from,
            stored_layer_ids=self.store.target_layer_ids if self.store is not None else None,
            train_examples=self.train_examples,
            target_lm_head=self.target_lm_head,
            device=self.device,
        )
        self.draft, self.spec = prepared.draft, prepared.spec
        self.notes.extend(prepared.notes)
        if not config.fsdp:  # one copy of the target's embedding / lm_head, not one per holder
            share_target_copies(self.draft, self.target_lm_head, self.inputs.target_embed)
        self.objective = self._make_objective()
        self.notes += get(config.method).training_notes(config.method_options, self.objective, self.device.type)
        self.target = frozen_target(self.inputs, self.objective.target_layer_ids)
        self.model = wrap_model(DraftWithObjective(self.draft, self.objective), self.context, fsdp=config.fsdp)
        self.optimizer = make_optimizer(self.draft, lr=config.peak_lr, weight_decay=config.weight_decay)

    def _set_up_schedule(self) -> None:
        """The run's length, its lr schedule, the objective's generator, the counters, the resolved config."""
        config = self.config
        plan = plan_schedule(config, len(self.batches))
        self.total_steps, self.warmup_steps = plan.total_steps, plan.warmup_steps
        self.step_cap, self.length_known = plan.step_cap, plan.length_known
        self.scheduler = make_scheduler(self.optimizer, plan, config.min_lr_ratio)
        self.generator = torch.Generator(self.device).manual_seed(config.seed * 1_000_003 + self.context.rank)
        self.step, self.tokens, self.seconds = 0, 0, 0.0
        # Wall-clock time besides the steps, for --max-minutes: evaluations, checkpoints and logging between steps
        # (``overhead``), loading (``once``), and the last evaluation's and checkpoint's durations (the end repeats them).
        self.overhead_seconds = self.once_seconds = self.eval_seconds = self.save_seconds = 0.0
        self.resolved_config = resolved_config(config, self.spec, target=self.info.ref, warmup_steps=self.warmup_steps)
        self.reporter: Reporter | None = None
        self.finish_only = False  # a resumed run whose steps are all done but whose final draft is not

    def _make_objective(self) -> Any:
        from spectool.training.objectives import make_objective

        return make_objective(self.config.method, self.draft, **self.config.options_of("objective"))

    # --- The loop -------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train to ``total_steps``, evaluating, logging and checkpointing on the way; write the final draft."""
        clean = False
        try:
            with self.stop_requests.listening():
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
        resumed_from = self.step if self.resume_from is not None else None
        if self.context.is_main:  # TensorBoard / W&B get the rows of metrics.jsonl (--report-to)
            hparams = {**self.resolved_config.to_json(), "total_steps": self.total_steps}
            self.reporter = open_reporter(self.resolved_config.report_to, self.out, hparams, start_step=self.step)
        self._emit("start", info=self.describe())
        self.once_seconds += self._now() - self.created
        window = MetricsWindow()
        last_row: dict[str, Any] = {}
        eval_row: dict[str, Any] = {}
        idle = 0  # steps in a row without a supervised prediction
        if self.finish_only:  # the steps were all done before a kill: evaluate (and calibrate) as the run would have
            last_row = rundir.logged_metrics(self.out, self.step)
            eval_row = self.evaluate() if self.eval_examples else {}
        while self.step < self.total_steps:
            stats = self.train_step()
            between = self._now()
            self.step += 1
            idle = idle + 1 if not stats["supervised"] else 0
            self._check_learning(idle)
            self.tokens += int(stats["tokens"])
            self.seconds += stats["seconds"]
            window.add(stats)
            if plan_due(self.config, self.step):
                self._plan()
            self._emit("step")
            final = self.step == self.total_steps
            logged = self._log_if_due(window, final)
            if logged is not None:
                (last_row, evaluated), window = logged, MetricsWindow()
                eval_row = evaluated if evaluated is not None else eval_row
            self._checkpoint_if_due(final)
            self.overhead_seconds += self._now() - between
        self._calibrate_confidence()
        path = self.save_final(last_row, eval_row)
        self._emit("done", path=str(path))
        metrics = {k: v for k, v in last_row.items() if not k.startswith("eval_")}
        return TrainResult(self.out, self.step, self.tokens, self.seconds, metrics, eval_row, resumed_from)

    def _check_learning(self, idle: int) -> None:
        """Stop when a whole epoch (or the whole run) of steps in a row had no supervised prediction."""
        if idle >= min(math.ceil(len(self.batches) / self.config.grad_accum), self.total_steps):
            raise SpectoolError(
                f"{idle} steps in a row had nothing to learn: no example supervises a single "
                f"{self.config.method} prediction (answers too short, or no assistant tokens within --max-length); "
                "nothing was saved. Check the data and --max-length"
            )

    def _log_if_due(self, window: MetricsWindow, final: bool) -> tuple[dict[str, Any], dict[str, float] | None] | None:
        """Log (and evaluate, when due) at a log step, an eval step and the last step: the row written and the
        evaluation (None when there was none), or None when nothing was due."""
        config = self.config
        due_eval = bool(self.eval_examples) and config.eval_every and self.step % config.eval_every == 0
        if not (final or due_eval or self.step % config.log_every == 0):
            return None
        row = window.row(self.step, self.scheduler.get_last_lr()[0], self.batches, self.tokens)
        evaluated = None
        if (due_eval or final) and self.eval_examples:
            evaluated = self.evaluate()
            row.update(evaluated)
        self._log(row)
        return row, evaluated

    def _checkpoint_if_due(self, final: bool) -> None:
        """Save every --save-every steps and at the end (when saving at all), or when asked to stop."""
        config = self.config
        stop = not final and self.stop_requests.requested()
        if not ((config.save_every and self.step % config.save_every == 0) or stop or (final and config.save_every)):
            return
        started = self._now()
        path = self.save_checkpoint()
        self.save_seconds = self._now() - started
        if stop:
            received = self.stop_requests.received or signal.SIGTERM  # another process got it: torchrun stops us all
            raise TrainingInterrupted(
                f"interrupted by {signal.Signals(received).name} at step {self.step} of {self.total_steps}; "
                f"saved {path}. Continue with: spectool train --out {quoted(self.out)} --resume",
                exit_code=EXIT_CODES.get(received, 130),
            )

    def _calibrate_confidence(self) -> None:
        """DSpark: fit the prefix scheduler's confidence temperatures on the last held-out evaluation and store them
        in the draft's config (`evaluation.calibrate_confidence`)."""
        data = getattr(self, "calibration_data", None)
        if not data:  # the same on every process: DSpark with a confidence head, after an evaluation
            return
        temperatures, self.calibration_blocks = calibrate_confidence(data, self.context)
        self.draft.config.confidence_temperatures = temperatures

    def _plan(self) -> None:
        """Re-plan ``total_steps`` for the --max-minutes budget from the speed so far (rank 0 decides)."""
        budget = self.config.max_minutes * 60.0
        total = self.context.decide_on_main(
            lambda: planned_steps(
                self.step,
                self.seconds,
                budget,
                self.step_cap,
                overhead=self.overhead_seconds,
                once=self.once_seconds,
                reserve=self.eval_seconds + self.save_seconds,
            )
        )
        self.total_steps, self.length_known = total, True
        set_total_steps(self.scheduler, total)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the step's (all-process) statistics."""
        started = self._now()
        target_seconds = 0.0
        local: dict[str, float] = {"supervised": 0.0, "loss_sum": 0.0, "nonfinite": 0.0, "tokens": 0.0}
        metric_sums: dict[str, float] = {}
        for micro in range(self.config.grad_accum):
            target_seconds += self._micro_step(micro == self.config.grad_accum - 1, local, metric_sums)
        stop = 1.0 if self.stop_requests.received else 0.0
        totals = self.context.sum_over_processes({**local, "stop": stop, **metric_sums})
        self.stop_requests.anywhere = totals["stop"] > 0
        if totals["nonfinite"]:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(self._diverged_message("the loss"))
        supervised = totals["supervised"]
        grad_norm = self._apply_gradients(supervised)
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

    def _micro_step(self, last: bool, local: dict[str, float], metric_sums: dict[str, float]) -> float:
        """Forward and backward over one micro-batch (gradients synchronised on the ``last`` one), adding to the
        step's sums; returns the seconds the target took."""
        batch, indices, tokens = self.feed.next_batch()
        t0 = self._now()
        target_batch = self.feed.target_features(batch, indices)
        target_seconds = self._now() - t0
        with gradient_sync(self.model, last):
            with self.feed.autocast():
                loss = self.model(target_batch, **self.feed.objective_kwargs(batch, self.generator))
            output = unwrap(self.model).last_output
            (loss * output.num_supervised).backward()
        n = float(output.num_supervised)
        local["supervised"] += n
        local["loss_sum"] += float(loss.detach()) * n
        local["nonfinite"] += 0.0 if math.isfinite(float(loss.detach())) else 1.0
        local["tokens"] += tokens
        for key, value in output.metrics.items():
            if key != "loss":
                metric_sums[key] = metric_sums.get(key, 0.0) + value * n
        return target_seconds

    def _apply_gradients(self, supervised: float) -> float:
        """Scale the summed gradients to the step's mean, clip them and step the optimizer and the schedule;
        returns the gradient norm."""
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
        return grad_norm

    def _clip_gradients(self) -> float:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
            norm = norm.full_tensor()
        return float(norm)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _diverged_message(self, what: str) -> str:
        last = rundir.latest_checkpoint(self.out)
        kept = (
            f"the last good checkpoint is {last} (continue from it with --resume and a lower --lr)"
            if last
            else ("no checkpoint was written yet (lower --lr, or check the data)")
        )
        return f"{what} became NaN or infinite at step {self.step + 1}; stopped without saving: {kept}"

    # --- Checkpoints and the final draft (`run_state`) ---------------------------------------------------------

    @property
    def parts(self) -> TrainingParts:
        """What a checkpoint holds the state of."""
        return TrainingParts(self.model, self.draft, self.optimizer, self.scheduler, self.generator, self.batches)

    def _metadata(self, metrics: dict[str, Any] | None = None) -> DraftMetadata:
        """spectool.json of a checkpoint or of the final draft: the target, and a summary of the training so far."""
        metadata = target_metadata(self.info, self.spec)
        metadata.target_layer_ids = list(self.spec.target_layer_ids)
        metadata.training = rundir.training_summary(
            self.config,
            step=self.step,
            total_steps=self.total_steps,
            tokens=self.tokens,
            seconds=self.seconds,
            metrics=metrics,
            calibration_blocks=getattr(self, "calibration_blocks", None),
        )
        return metadata

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-<7-digit step>`` (every process must call this), keep the last --keep-last."""
        counters = RunCounters(self.step, self.tokens, self.seconds, self.overhead_seconds, self.once_seconds)
        config = self.resolved_config.to_json()
        path = self.checkpoints.save(self.parts, counters, self.total_steps, self._metadata(), config)
        self._emit("checkpoint", path=str(path))
        return path

    def save_final(self, metrics: dict[str, Any], eval_metrics: dict[str, Any]) -> Path:
        """The trained draft in OUT itself, with a ``training`` summary of these metrics in spectool.json."""
        final_metrics = {k: v for k, v in {**metrics, **eval_metrics}.items() if isinstance(v, (int, float))}
        return self.checkpoints.save_final(self.parts, self.step, self._metadata(final_metrics), self.config.save_dtype)

    def _resume(self, path: Path) -> None:
        """Continue from the checkpoint at `path` (its weights came with the draft): its state, counters and plan."""
        restored = self.checkpoints.restore(
            path, self.parts, self.resolved_config.to_json(), seed=self.config.seed, state=self.checked.resume_state
        )
        self.checked.resume_state = None
        counters = restored.counters
        self.step, self.tokens, self.seconds = counters.step, counters.tokens, counters.seconds
        self.overhead_seconds, self.once_seconds = counters.overhead_seconds, counters.once_seconds
        self.notes.extend(restored.notes)
        if self.config.max_minutes:
            self._plan()  # the budget counts the time already spent
        if self.step >= self.total_steps:
            if rundir.final_draft_steps(self.out) == self.step:
                raise UsageError(
                    f"the run in {self.out} already finished ({self.step} of {self.total_steps} steps); raise "
                    "--max-steps, --epochs or --max-minutes to train longer"
                )
            # Stopped after its last checkpoint but before (or while) writing the final draft: write it now.
            self.finish_only = True
            self.notes.append(f"all {self.step} steps were done; writing the final draft the run did not finish")
        restart_schedule(
            self.scheduler,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            peak_lr=self.config.peak_lr,
            min_lr_ratio=self.config.min_lr_ratio,
            step=self.step,
        )
        if self.context.is_main:
            rundir.truncate_metrics(self.out, self.step)
            rundir.write_config(self.out, self.resolved_config.to_json())

    # --- Evaluation -----------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Loss and metrics on the held-out split, ``eval_``-prefixed (`evaluation.evaluate`)."""
        config = self.config
        started = self._now()
        result = evaluate(
            self.model, self.feed, seed=config.seed, batch_size=config.batch_size, limit=config.eval_batches
        )
        self.eval_seconds = self._now() - started
        self.calibration_data = result.calibration
        return result.row

    # --- Logging --------------------------------------------------------------------------------------------

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
            "target_dtype": self.store.manifest.get("feature_dtype")
            if self.store is not None
            else self.inputs.target_dtype,
            "draft_dtype": "bfloat16 autocast" if self.autocast_dtype is not None else "float32",
            "mode": "features" if self.store is not None else "online",
            "data": self.inputs.data_report,
            "notes": list(self.notes),
        }

    def _log(self, row: dict[str, Any]) -> None:
        if self.context.is_main:
            rundir.append_metrics(self.out, row)
            if self.reporter is not None:
                self.reporter.log(row)
        self._emit("log", row=row)

    def _emit(self, kind: str, **fields: Any) -> None:
        if self.callback is not None and self.context.is_main:
            total = self.total_steps if self.length_known else None
            self.callback(TrainEvent(kind, self.step, total, **fields))  # type: ignore[arg-type]


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    force: bool = False,
    callback: Callable[[TrainEvent], None] | None = None,
) -> TrainResult:
    """Train a draft as ``config`` says (see `Trainer`)."""
    return Trainer(config, resume=resume, force=force, callback=callback).run()
