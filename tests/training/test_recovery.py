"""Nothing a user has is lost: crafted and damaged checkpoints, kills between the last checkpoint and the final
draft, file modes, and real SIGKILLs of a training process at random moments."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from spectool.checkpoint import load_draft, save_draft
from spectool.errors import SpectoolError
from spectool.training.rundir import STATE_FILE, final_draft_steps, latest_checkpoint
from spectool.training.trainer import Trainer
from tests.training.conftest import write_jsonl
from tests.training.test_trainer import METHOD_OPTIONS, conversations, data_file, draft_state, make_config  # noqa: F401


def run_with_checkpoints(tiny_target_dir, data_file, out, **overrides):  # noqa: F811
    options = {"max_steps": 3, "save_every": 1, "keep_last": 3, **overrides}
    trainer = Trainer(make_config(tiny_target_dir, data_file, out, **options))
    trainer.run()
    return trainer


class Planted:
    """Unpickling this runs code: what a crafted trainer_state.pt would do with weights_only=False."""

    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def test_a_crafted_trainer_state_runs_nothing(tiny_target_dir, data_file, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    run_with_checkpoints(tiny_target_dir, data_file, out, max_steps=2, keep_last=1)
    state_file = out / "checkpoints" / "step-0000002" / STATE_FILE
    state = torch.load(state_file, weights_only=True)
    state["optimizer"] = Planted()
    torch.save(state, state_file)
    monkeypatch.chdir(tmp_path)
    config = make_config(tiny_target_dir, data_file, out, max_steps=4, save_every=1)
    with pytest.raises(SpectoolError) as error:
        Trainer(config, resume=True)
    assert not (tmp_path / "pwned-by-checkpoint").exists()
    message = str(error.value)
    assert "unreadable trainer state" in message and "\n" not in message and str(state_file) in message


def test_a_trainer_state_with_missing_keys_is_one_line(tiny_target_dir, data_file, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    run_with_checkpoints(tiny_target_dir, data_file, out, max_steps=2, keep_last=1)
    state_file = out / "checkpoints" / "step-0000002" / STATE_FILE
    state = torch.load(state_file, weights_only=True)
    del state["optimizer"], state["rng"]
    torch.save(state, state_file)
    with pytest.raises(SpectoolError, match="trainer state lacks optimizer, rng") as error:
        Trainer(make_config(tiny_target_dir, data_file, out, max_steps=4, save_every=1), resume=True)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("damage", ["weights", "state"])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous(tiny_target_dir, data_file, tmp_path, damage):  # noqa: F811
    straight = run_with_checkpoints(tiny_target_dir, data_file, tmp_path / "straight", max_steps=4)
    out = tmp_path / "run"
    run_with_checkpoints(tiny_target_dir, data_file, out, max_steps=3)
    latest = out / "checkpoints" / "step-0000003"
    victim = latest / ("model.safetensors" if damage == "weights" else STATE_FILE)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a disk that lost the file's tail
    resumed = Trainer(make_config(tiny_target_dir, data_file, out, max_steps=4, save_every=1), resume=True)
    assert resumed.step == 2
    notes = resumed.describe()["notes"]
    assert any(
        "step-0000003" in note and "resuming from the previous checkpoint, step-0000002" in note for note in notes
    )
    resumed.run()
    a, b = draft_state(straight), draft_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the fallback lost a step of time, not exactness


def test_a_kill_before_the_final_draft_is_finished_on_resume(tiny_target_dir, data_file, tmp_path):  # noqa: F811
    """Killed after the last checkpoint, before or during the final export: --resume writes the final draft
    (it used to call the run finished and leave nothing `chat` could load)."""
    options = {**METHOD_OPTIONS["dspark"], "eval_fraction": 0.25}
    reference = tmp_path / "reference"
    run_with_checkpoints(tiny_target_dir, data_file, reference, **options)
    expected = load_draft(reference)
    for cut in ("nothing", "weights only", "no spectool.json"):
        out = tmp_path / cut.replace(" ", "-")
        shutil.copytree(reference, out)
        if cut == "nothing":
            for name in ("model.safetensors", "config.json", "spectool.json"):
                (out / name).unlink()
        elif cut == "weights only":
            (out / "config.json").unlink()
            (out / "spectool.json").unlink()
        else:
            (out / "spectool.json").unlink()
        if cut != "no spectool.json":  # what `chat` met: no draft it could load
            with pytest.raises(SpectoolError):
                load_draft(out)
        config = make_config(tiny_target_dir, data_file, out, max_steps=3, save_every=1, keep_last=3, **options)
        resumed = Trainer(config, resume=True)
        assert resumed.finish_only and resumed.step == 3
        result = resumed.run()
        assert result.steps == 3
        final = load_draft(out)
        assert final.metadata.training["steps"] == 3
        assert final.model.config.confidence_temperatures == expected.model.config.confidence_temperatures
        state, want = final.model.state_dict(), expected.model.state_dict()
        assert all(torch.equal(state[k], want[k]) for k in want)
        with pytest.raises(SpectoolError, match="already finished"):
            Trainer(config, resume=True)


def test_written_files_honour_the_umask(tiny_target_dir, data_file, tmp_path):  # noqa: F811
    previous = os.umask(0o022)
    try:
        out = tmp_path / "run"
        run_with_checkpoints(tiny_target_dir, data_file, out, max_steps=1)
        files = [p for p in out.rglob("*") if p.is_file()]
        assert any(p.name == "model.safetensors" for p in files) and any(p.name == STATE_FILE for p in files)
        modes = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777) for p in files}
        assert set(modes.values()) == {"0o644"}, modes
        os.umask(0o027)
        draft = load_draft(out)
        save_draft(draft.model, tmp_path / "copy", method=draft.method)
        assert oct((tmp_path / "copy" / "model.safetensors").stat().st_mode & 0o777) == "0o640"
    finally:
        os.umask(previous)


#: Steps of the killed run: enough that a fast CPU (a Xeon trains the tiny target at ~50 steps/s) is still
#: training when the next kill comes (with 60, one such run ended after two kills).
STEPS = 150


@pytest.mark.slow
def test_random_sigkills_always_resume_to_a_loadable_draft(tiny_target_dir, tmp_path):
    """A real `spectool train` process killed with SIGKILL at random moments (while loading, training, writing
    checkpoints or the final draft), then resumed each time (or started again when no checkpoint was written yet):
    the run always ends with a final draft that loads, at the planned step."""
    data = write_jsonl(tmp_path / "data.jsonl", conversations(64, seed=3))
    out = tmp_path / "run"
    base = [
        sys.executable, "-m", "spectool", "train", "--target", str(tiny_target_dir), "--method", "dflash",
        "--data", str(data), "--out", str(out), "--max-steps", str(STEPS), "--batch-size", "4", "--max-length", "48",
        "--save-every", "1", "--keep-last", "2", "--eval-fraction", "0", "--log-every", "1", "--device", "cpu",
        "--block-size", "4", "--num-anchors", "6", "--mask-token-id", "6", "--save-dtype", "float32",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    rng = random.Random(int(os.environ.get("SPECTOOL_KILL_SEED", "20")))
    kills = 0
    for _attempt in range(12):
        if final_draft_steps(out) == STEPS:  # killed after the final draft was whole, as it exited
            break
        command = base + (["--resume"] if latest_checkpoint(out) is not None else ["--force"])
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kills < 6:
            # Wait until the process trains (a new metrics row), then kill it somewhere in the rest of the run.
            metrics = out / "metrics.jsonl"
            size = metrics.stat().st_size if metrics.exists() else -1
            started = time.monotonic()
            while process.poll() is None and time.monotonic() - started < 120:
                if (metrics.stat().st_size if metrics.exists() else -1) != size:
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.5))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills += 1
        _, stderr = process.communicate(timeout=300)
        if process.returncode == 0:
            break
        assert process.returncode == -signal.SIGKILL, stderr.decode()
    else:
        pytest.fail("the run never finished")
    assert kills >= 3
    final = load_draft(out)
    assert final.method == "dflash" and final.metadata.training["steps"] == STEPS
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, STEPS + 1))  # each step once, in order, across all the kills
