"""Trainer mechanics on a tiny target: exact resume, atomic checkpoints, NaN stop, pruning, metrics, weighting."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest
import torch

import spectool.checkpoint as checkpoint_module
import spectool.training.objectives as objectives_module
from spectool.checkpoint import load_draft
from spectool.training.config import TrainConfig
from spectool.training.optimization import planned_steps
from spectool.training.progress import TrainingDiverged, TrainingInterrupted
from spectool.training.rundir import STATE_FILE, latest_checkpoint
from spectool.training.trainer import Trainer, train
from tests.training.conftest import write_jsonl

WORDS = "hi hello there how is it going fine thanks what the time now one two three four five six seven".split()


def conversations(count: int, *, seed: int = 0, same_shape: bool = False) -> list[dict]:
    """Random two-turn conversations of single-token words; ``same_shape`` gives every row the same length."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        q_len, a_len = (4, 12) if same_shape else (rng.randint(2, 6), rng.randint(6, 14))
        question = " ".join(rng.choice(WORDS) for _ in range(q_len))
        answer = " ".join(rng.choice(WORDS) for _ in range(a_len))
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


@pytest.fixture
def data_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "data.jsonl", conversations(16))


def make_config(target_dir: Path, data: Path, out: Path, **overrides) -> TrainConfig:
    fields = dict(
        method="dflash",
        target=str(target_dir),
        data=str(data) if data else None,
        out=str(out),
        max_steps=4,
        batch_size=4,
        max_length=48,
        lr=3e-3,
        warmup_steps=1,
        eval_fraction=0.0,
        save_every=0,
        log_every=1,
        device="cpu",
        save_dtype="float32",
        num_anchors=6,
        block_size=4,
        mask_token_id=6,  # "[UNK]": never produced by the word-level tokenizer on this data
    )
    fields.update(overrides)
    return TrainConfig.from_dict(fields)


def draft_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.draft.state_dict().items()}


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


EAGLE = dict(block_size=None, mask_token_id=None, num_anchors=None)
METHOD_OPTIONS = {
    "eagle1": dict(method="eagle1", **EAGLE),
    "eagle3": dict(method="eagle3", ttt_steps=2, target_layer_ids=[-1, 0, 1], draft_vocab_size=24, **EAGLE),
    "dflash": dict(method="dflash"),
    "dspark": dict(method="dspark", markov_rank=8),
}


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_resume_after_ctrl_c_is_bitwise_identical(method, tiny_target_dir, data_file, tmp_path):
    options = {"max_steps": 4, **METHOD_OPTIONS[method]}
    straight = Trainer(make_config(tiny_target_dir, data_file, tmp_path / "straight", **options))
    straight.run()

    def interrupt_at_step_2(event):
        if event.kind == "step" and event.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    config = make_config(tiny_target_dir, data_file, tmp_path / "resumed", **options)
    with pytest.raises(TrainingInterrupted) as stopped:
        Trainer(config, callback=interrupt_at_step_2).run()
    assert stopped.value.exit_code == 130
    assert "SIGINT at step 2" in str(stopped.value) and "--resume" in str(stopped.value)
    assert latest_checkpoint(tmp_path / "resumed").name == "step-0000002"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    resumed = Trainer(config, resume=True)
    assert resumed.step == 2
    resumed.run()
    a, b = draft_state(straight), draft_state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[row["loss"] for row in rows(tmp_path / name)] for name in ("straight", "resumed")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    final = load_draft(tmp_path / "resumed")
    assert final.method == method
    assert all(torch.equal(final.model.state_dict()[k], b[k].cpu()) for k in b)


def test_sigterm_exit_code(tiny_target_dir, data_file, tmp_path):
    def terminate(event):
        if event.kind == "step" and event.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as stopped:
        Trainer(make_config(tiny_target_dir, data_file, tmp_path / "run"), callback=terminate).run()
    assert stopped.value.exit_code == 143
    assert latest_checkpoint(tmp_path / "run").name == "step-0000001"


def test_a_kill_while_saving_keeps_the_previous_checkpoint(tiny_target_dir, data_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save_file = checkpoint_module.save_file
    calls = []

    def dies_on_second_save(tensors, path, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            real_save_file(tensors, path, **kwargs)  # half the work is on disk when the "kill" comes
            raise KeyboardInterrupt
        return real_save_file(tensors, path, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", dies_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        train(make_config(tiny_target_dir, data_file, out, save_every=1, max_steps=3))
    monkeypatch.setattr(checkpoint_module, "save_file", real_save_file)

    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000001"]  # no half-written step-0000002
    first = checkpoints / "step-0000001"
    assert load_draft(first).method == "dflash"
    assert torch.load(first / STATE_FILE, weights_only=False)["step"] == 1
    resumed = Trainer(make_config(tiny_target_dir, data_file, out, save_every=1, max_steps=3), resume=True)
    assert resumed.step == 1
    assert resumed.run().steps == 3


class _NaNAfter:
    """Wraps an objective; from call ``at`` on, the loss is NaN."""

    def __init__(self, objective, at: int) -> None:
        self.objective, self.at, self.calls = objective, at, 0

    def __getattr__(self, name):
        return getattr(self.objective, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        out = self.objective(*args, **kwargs)
        if self.calls >= self.at:
            out.loss = out.loss * float("nan")
        return out


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_target_dir, data_file, tmp_path, monkeypatch):
    real = objectives_module.make_objective
    monkeypatch.setattr(objectives_module, "make_objective", lambda *a, **k: _NaNAfter(real(*a, **k), at=4))
    out = tmp_path / "run"
    trainer = Trainer(make_config(tiny_target_dir, data_file, out, save_every=2, max_steps=6))
    with pytest.raises(TrainingDiverged) as diverged:
        trainer.run()
    message = str(diverged.value)
    assert "NaN or infinite at step 4" in message and "step-0000002" in message and "\n" not in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]
    assert not (out / "model.safetensors").exists()
    kept = load_draft(out / "checkpoints" / "step-0000002").model.state_dict()
    assert all(torch.isfinite(v).all() for v in kept.values() if v.is_floating_point())


def test_keep_last_k_checkpoints(tiny_target_dir, data_file, tmp_path):
    out = tmp_path / "run"
    train(make_config(tiny_target_dir, data_file, out, save_every=1, keep_last=2, max_steps=4))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000003", "step-0000004"]


def test_metrics_rows_final_draft_and_config(tiny_target_dir, data_file, tmp_path):
    out = tmp_path / "run"
    config = make_config(tiny_target_dir, data_file, out, max_steps=4, log_every=2, eval_every=2, eval_fraction=0.25)
    result = train(config)
    logged = rows(out)
    assert [row["step"] for row in logged] == [2, 4]
    for row in logged:
        for key in ("step", "loss", "lr", "tokens_per_second", "acc@1", "acceptance_length", "grad_norm"):
            assert isinstance(row[key], (int, float)), key
        assert 0 < row["target_forward_fraction"] < 1
        assert row["eval_loss"] > 0 and row["eval_acceptance_length"] >= 1 and "eval_acc@1" in row
    assert result.eval_metrics["eval_loss"] == logged[-1]["eval_loss"]

    saved = json.loads((out / "train_config.json").read_text())
    assert saved["lr"] == 3e-3 and saved["block_size"] == 4 and saved["target_layer_ids"] == [1]
    meta = json.loads((out / "spectool.json").read_text())
    assert meta["target"] == str(tiny_target_dir.resolve()) and meta["method"] == "dflash"
    training = meta["training"]
    assert training["steps"] == 4 and training["tokens"] == result.tokens > 0 and training["seconds"] > 0
    assert (
        training["data"] == str(data_file)
        and training["final_metrics"]["eval_loss"] == result.eval_metrics["eval_loss"]
    )
    assert load_draft(out).model.config.block_size == 4


def first_step_gradients(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Run ``trainer`` and return the gradients its first optimizer step applied."""
    grads: list[dict[str, torch.Tensor]] = []

    def keep(_optimizer, _args, _kwargs):
        if not grads:
            grads.append({n: p.grad.clone() for n, p in trainer.draft.named_parameters() if p.grad is not None})

    trainer.optimizer.register_step_pre_hook(keep)
    trainer.run()
    return grads[0]


def test_micro_batches_are_weighted_by_their_supervised_count(tiny_target_dir, data_file, tmp_path):
    """2 micro-batches of 2 rows give the gradient of 1 batch of 4 rows, though the rows differ in length: with
    one TTT step the EAGLE-3 loss is a plain mean over supervised positions, so only count weighting matches."""
    common = dict(
        method="eagle3",
        max_steps=1,
        grad_clip=0.0,
        block_size=None,
        mask_token_id=None,
        num_anchors=None,
        ttt_steps=1,
        target_layer_ids=[-1, 0, 1],
    )
    whole = first_step_gradients(
        Trainer(make_config(tiny_target_dir, data_file, tmp_path / "a", batch_size=4, **common))
    )
    split = first_step_gradients(
        Trainer(make_config(tiny_target_dir, data_file, tmp_path / "b", batch_size=2, grad_accum=2, **common))
    )
    assert whole.keys() == split.keys() and "fc.weight" in whole
    for name in whole:
        assert torch.allclose(whole[name], split[name], rtol=1e-5, atol=1e-6), name
    norms = [rows(tmp_path / name)[0]["grad_norm"] for name in ("a", "b")]
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)


def test_eagle3_draft_vocabulary_comes_from_the_data(tiny_target_dir, data_file, tmp_path):
    out = tmp_path / "run"
    config = make_config(
        tiny_target_dir,
        data_file,
        out,
        method="eagle3",
        max_steps=1,
        block_size=None,
        mask_token_id=None,
        num_anchors=None,
        ttt_steps=2,
        draft_vocab_size=24,
        target_layer_ids=[-1, 0, 1],
    )
    trainer = Trainer(config)
    draft = trainer.draft
    kept = draft.draft_to_target(torch.arange(24)).tolist()
    supervised = {t for e in trainer.train_examples for t, m in zip(e.input_ids, e.loss_mask, strict=True) if m}
    assert supervised <= set(kept)  # fewer than 24 distinct answer tokens: all of them are kept
    head = trainer.target_lm_head.weight
    assert torch.equal(draft.lm_head.weight, head[draft.draft_to_target(torch.arange(24))])
    assert any("draft vocabulary" in note for note in trainer.notes)
    trainer.run()
    assert load_draft(out).model.d2t.tolist() == [t - i for i, t in enumerate(kept)]


def test_init_starts_from_an_existing_draft(tiny_target_dir, data_file, tmp_path):
    from spectool.draft_init import init_draft
    from spectool.errors import UsageError

    start = tmp_path / "start"
    init_draft(str(tiny_target_dir), "dflash", start, block_size=4, mask_token_id=6, seed=9, dtype="float32")
    trainer = Trainer(make_config(tiny_target_dir, data_file, tmp_path / "run", init=str(start), max_steps=1))
    initial = load_draft(start).model.state_dict()
    assert all(torch.equal(initial[k], v) for k, v in trainer.draft.state_dict().items())
    trainer.run()
    with pytest.raises(UsageError, match="holds a dflash draft, not eagle1"):
        Trainer(
            make_config(tiny_target_dir, data_file, tmp_path / "other", init=str(start), **METHOD_OPTIONS["eagle1"])
        )


def test_a_run_from_init_records_the_draft_it_started_from(tiny_target_dir, data_file, tmp_path):
    """Stage 2 of a draft names stage 1 and carries stage 1's own training entry, so the stages add up."""
    Trainer(make_config(tiny_target_dir, data_file, tmp_path / "stage1", max_steps=1)).run()
    stage1 = json.loads((tmp_path / "stage1" / "spectool.json").read_text())["training"]
    assert "init" not in stage1
    Trainer(
        make_config(tiny_target_dir, data_file, tmp_path / "stage2", init=str(tmp_path / "stage1"), max_steps=2)
    ).run()
    stage2 = json.loads((tmp_path / "stage2" / "spectool.json").read_text())["training"]
    assert stage2["steps"] == 2 and stage2["init"] == {"from": str(tmp_path / "stage1"), "training": stage1}


def test_planned_steps():
    assert planned_steps(10, 5.0, 60.0, None) == 120  # 0.5 s per step, 55 s left
    assert planned_steps(10, 5.0, 60.0, 50) == 50
    assert planned_steps(10, 70.0, 60.0, None) == 10  # over budget: stop now
    # 1 s per step plus 0.5 s of evaluations per step; 4 s of loading and 6 s kept for the end: 30 s left at 1.5
    assert planned_steps(10, 10.0, 55.0, None, overhead=5.0, once=4.0, reserve=6.0) == 30


class HandClock:
    """The trainer's clock, moved only by hand: loading takes 6 s, a step 3 s, an evaluation 10 s, a checkpoint 2 s."""

    def __init__(self, monkeypatch):
        import spectool.training.trainer as trainer_module

        self.now = 0.0
        monkeypatch.setattr(Trainer, "_now", lambda trainer: self.now)
        self.wrap(monkeypatch, Trainer, "_setup", 6.0)
        self.wrap(monkeypatch, Trainer, "save_checkpoint", 2.0)
        self.wrap(monkeypatch, trainer_module, "evaluate", 10.0)
        original_step = Trainer.train_step

        def train_step(trainer):
            stats = original_step(trainer)
            self.now += 3.0
            return {**stats, "seconds": 3.0}

        monkeypatch.setattr(Trainer, "train_step", train_step)

    def wrap(self, monkeypatch, owner, name, seconds):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            result = original(*args, **kwargs)
            self.now += seconds
            return result

        monkeypatch.setattr(owner, name, timed)


def test_max_minutes_counts_loading_evaluations_and_checkpoints(tiny_target_dir, data_file, tmp_path, monkeypatch):
    clock = HandClock(monkeypatch)
    options = dict(max_steps=None, max_minutes=1.5, warmup_steps=None, log_every=5, eval_every=5, save_every=5)
    options["eval_fraction"] = 0.25
    result = Trainer(make_config(tiny_target_dir, data_file, tmp_path / "budget", **options)).run()
    # Planned at step 10 (30 s of steps, 24 s of two evaluations + checkpoints, 6 s loading, 12 s kept for the end:
    # 18 s left at 4.2 s a step -> 17), then at step 15 (45 + 36 + 6 + 12 > 90 - 4.6: stop at 15).
    assert result.steps == 15 and result.seconds == 45.0
    assert clock.now == 87.0  # 6 + 15 x 3 + 3 x (10 + 2): within the 90 s
    capped = Trainer(make_config(tiny_target_dir, data_file, tmp_path / "capped", **{**options, "max_steps": 7}))
    assert capped.run().steps == 7

    def interrupt_at_step_12(event):
        if event.kind == "step" and event.step == 12:
            os.kill(os.getpid(), signal.SIGINT)

    config = make_config(tiny_target_dir, data_file, tmp_path / "resumed", **options)
    with pytest.raises(TrainingInterrupted):
        Trainer(config, callback=interrupt_at_step_12).run()
    resumed = Trainer(config, resume=True)
    # The state holds 36 s of steps, 24 s of evaluations and checkpoints and 6 s of loading: 5 s a step, 24 s left
    assert resumed.total_steps == 16
    assert resumed.run().steps == 16


def test_dspark_confidence_temperatures_are_calibrated_on_the_held_out_split(tiny_target_dir, data_file, tmp_path):
    from spectool.decoding.draft_length import CALIBRATION_GRID

    options = {**METHOD_OPTIONS["dspark"], "max_steps": 2, "eval_fraction": 0.25}
    Trainer(make_config(tiny_target_dir, data_file, tmp_path / "run", **options)).run()
    temperatures = json.loads((tmp_path / "run" / "config.json").read_text())["confidence_temperatures"]
    assert len(temperatures) == 4 and all(t in CALIBRATION_GRID for t in temperatures)  # block_size 4
    assert load_draft(tmp_path / "run").model.config.confidence_temperatures == temperatures
    summary = json.loads((tmp_path / "run" / "spectool.json").read_text())["training"]
    assert summary["confidence_calibration_blocks"] > 0
    Trainer(make_config(tiny_target_dir, data_file, tmp_path / "no-eval", **{**options, "eval_fraction": 0.0})).run()
    assert "confidence_temperatures" not in json.loads((tmp_path / "no-eval" / "config.json").read_text())


def test_weights_that_became_infinite_are_never_saved(tiny_target_dir, data_file, tmp_path):
    """A step can turn the weights into NaN / inf before any loss shows it (a far too high lr): neither a
    checkpoint nor the final draft is written from them, and the last good checkpoint stays."""
    trainer = Trainer(make_config(tiny_target_dir, data_file, tmp_path / "run", max_steps=2, save_every=1))
    trainer.train_step()
    trainer.step = 1
    good = trainer.save_checkpoint()
    with torch.no_grad():
        next(p for p in trainer.draft.parameters() if p.requires_grad).view(-1)[0] = float("inf")
    for save in (trainer.save_checkpoint, lambda: trainer.save_final({}, {})):
        with pytest.raises(TrainingDiverged, match=f"NaN or infinite by step 1; nothing was saved .*{good.name}"):
            save()
    assert latest_checkpoint(tmp_path / "run") == good and not (tmp_path / "run" / "model.safetensors").exists()
    trainer.close()
