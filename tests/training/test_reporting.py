"""`--report-to`: every metrics.jsonl scalar reaches TensorBoard / W&B with its step, also across a resume."""

from __future__ import annotations

import json
import os
import signal
import struct
import time
from pathlib import Path

import pytest

from spectool.errors import UsageError
from spectool.training import reporting
from spectool.training.progress import TrainingInterrupted
from spectool.training.reporting import resolve_report_to, scalars
from spectool.training.trainer import Trainer, train
from tests.training.test_trainer import data_file, make_config, rows  # noqa: F401


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in ``log_dir`` read with TensorBoard's own reader (orphaned steps purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
    }


def expected_series(metrics: list[dict]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in metrics:
        for key, value in scalars(row).items():
            series.setdefault(key, []).append((row["step"], value))
    return series


def assert_same(logged: dict, expected: dict) -> None:
    assert set(logged) == set(expected)
    for tag, points in expected.items():
        steps = [step for step, _ in logged[tag]]
        assert steps == [step for step, _ in points], tag  # in order, none duplicated
        assert [value for _, value in logged[tag]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-6), tag


def test_report_to_values():
    assert resolve_report_to("none") == []
    assert resolve_report_to(" tensorboard , tensorboard") == ["tensorboard"]
    assert resolve_report_to(None) == ["tensorboard"]  # installed in the test environment
    for bad in ("foo", "tensorboard,foo", "none,tensorboard", ","):
        with pytest.raises(UsageError):
            resolve_report_to(bad)


def test_missing_package_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(reporting, "_installed", lambda package: False)
    assert resolve_report_to(None) == []
    with pytest.raises(UsageError, match=r"pip install 'spectool\[wandb\]'"):
        resolve_report_to("wandb")


def test_tensorboard_gets_every_metric_and_resume_does_not_duplicate(tiny_target_dir, data_file, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    config = make_config(tiny_target_dir, data_file, out, report_to="tensorboard", eval_fraction=0.25, eval_every=2)

    def interrupt_at_step_2(event):
        if event.kind == "step" and event.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        Trainer(config, callback=interrupt_at_step_2).run()
    # A killed run may have logged past its checkpoint: add a row at step 3 that the resume must replace.
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"step": 3, "loss": 99.0}) + "\n")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / "tensorboard")) as writer:
        writer.add_scalar("loss", 99.0, 3)
    assert (3, 99.0) in tensorboard_scalars(out / "tensorboard")["loss"]

    train(config, resume=True)
    metrics = rows(out)
    assert [row["step"] for row in metrics] == [1, 2, 3, 4]
    assert any(key.startswith("eval_") for key in metrics[1]) and "lr" in metrics[0] and "grad_norm" in metrics[0]
    logged = tensorboard_scalars(out / "tensorboard")
    assert_same(logged, expected_series(metrics))
    assert json.loads((out / "train_config.json").read_text())["report_to"] == "tensorboard"


def test_report_to_none_writes_nothing(tiny_target_dir, data_file, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    train(make_config(tiny_target_dir, data_file, out, max_steps=1, report_to="none"))
    assert not (out / "tensorboard").exists() and not (out / "wandb").exists()


def wandb_records(path: Path) -> list[bytes]:
    """The records of a .wandb transaction log (LevelDB log format: 32 KiB blocks of 7-byte-headed chunks after
    a 7-byte file header), read here because wandb no longer ships a Python reader."""
    data, records, pos, pending = path.read_bytes(), [], 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += room
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # full
            records.append(chunk)
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            records.append(pending + chunk)
    return records


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of an offline W&B run."""
    from wandb.proto import wandb_internal_pb2

    found = []
    for path in sorted(run_dir.glob("*.wandb")):
        for data in wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                found.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return found


def test_wandb_offline_resumes_the_same_run(tiny_target_dir, data_file, tmp_path, monkeypatch):  # noqa: F811
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    out = tmp_path / "run"
    config = make_config(tiny_target_dir, data_file, out, report_to="wandb", max_steps=3)

    def interrupt_at_step_2(event):
        if event.kind == "step" and event.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        Trainer(config, callback=interrupt_at_step_2).run()
    run_id = (out / "wandb_run_id").read_text().strip()
    train(config, resume=True)
    assert (out / "wandb_run_id").read_text().strip() == run_id
    # W&B's writer is a separate process: give the resumed session's file time to be complete on disk (a read
    # right after finish() once saw only the first session's steps in CI, and once even after 10 s on a busy run)
    deadline = time.monotonic() + 60
    while True:
        runs = sorted((out / "wandb" / "wandb").glob(f"offline-run-*-{run_id}"))
        history = [row for run in runs for row in wandb_history(run)]
        by_step = {row["_step"]: row for row in history}
        if sorted(by_step) == [1, 2, 3] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert runs, list((out / "wandb").rglob("*"))
    assert sorted(by_step) == [1, 2, 3]
    for row in rows(out):
        for key, value in scalars(row).items():
            assert by_step[row["step"]][key] == pytest.approx(value, rel=1e-9), key
