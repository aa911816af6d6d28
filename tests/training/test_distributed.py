"""Several processes: row sharding, and `torchrun -m spectool train` (gloo DDP / FSDP2 on CPU) against one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spectool.chat_format import TokenizedExample
from spectool.checkpoint import load_draft
from spectool.errors import UsageError
from spectool.training.batches import collate
from spectool.training.distributed import DistributedContext, DraftWithObjective, shard_batch, wrap_model
from spectool.training.trainer import train
from tests.training.conftest import write_jsonl
from tests.training.test_trainer import conversations, make_config, rows


def test_shard_batch_gives_each_process_a_disjoint_slice():
    examples = [TokenizedExample([i] * (i + 1), [1] * (i + 1)) for i in range(5)]
    batch = collate(examples, pad_token_id=0)
    parts = [shard_batch(batch, DistributedContext(rank=r, world_size=2)) for r in range(2)]
    assert [p.input_ids.shape[0] for p in parts] == [3, 3]
    assert torch.equal(torch.cat([p.input_ids for p in parts])[:5], batch.input_ids)
    padding = parts[1]
    assert torch.equal(padding.input_ids[-1], batch.input_ids[0])  # the filler copies row 0 ...
    assert int(padding.loss_mask[-1].sum()) == 0  # ... and supervises nothing
    assert shard_batch(batch, DistributedContext()) is batch


def test_fsdp_needs_several_processes():
    with pytest.raises(UsageError, match="torchrun"):
        wrap_model(DraftWithObjective(torch.nn.Linear(2, 2), None), DistributedContext(), fsdp=True)


def torchrun(args: list[str], tmp_path: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 -m spectool ARGS`` in its own session, killed whole if it overruns."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "spectool", *args]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and its workers
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def cli_args(config) -> list[str]:
    """The command-line form of a `make_config` configuration."""
    args = ["train"]
    for key, value in config.to_json().items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, list):
            args.append(f"{flag}={','.join(map(str, value))}")
        else:
            args.append(f"{flag}={value}")
    return args


EAGLE3 = dict(method="eagle3", ttt_steps=1, target_layer_ids=[-1, 0, 1], block_size=None, mask_token_id=None)


@pytest.mark.parametrize(
    "options",
    [
        {},
        pytest.param({"fsdp": True}, marks=pytest.mark.slow),
        pytest.param({"shard_target": True}, marks=pytest.mark.slow),
    ],
    ids=["ddp", "fsdp", "shard-target"],
)
def test_two_processes_make_the_update_of_one(options, tiny_target_dir, tmp_path):
    """Each process takes half of every global batch (17 examples: the last batch has an odd row count, so one
    process gets a masked filler row); gradients are averaged and re-weighted by supervised counts, so the updates
    equal one process training on the whole batches. EAGLE-3 with one TTT step has no randomness to differ in."""
    data = write_jsonl(tmp_path / "data.jsonl", conversations(17))
    common = dict(max_steps=4, grad_clip=0.0, eval_fraction=0.25, eval_every=2, save_every=2, num_anchors=None)
    single = train(make_config(tiny_target_dir, data, tmp_path / "single", **EAGLE3, **common))
    parallel_config = make_config(tiny_target_dir, data, tmp_path / "parallel", **options, **EAGLE3, **common)
    result = torchrun(cli_args(parallel_config), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Trained 4 steps") == 1  # only rank 0 reports
    assert ("target sharded over 2 processes" in result.stdout + result.stderr) == bool(options.get("shard_target"))

    parallel_rows, single_rows = rows(tmp_path / "parallel"), rows(tmp_path / "single")
    assert [r["step"] for r in parallel_rows] == [1, 2, 3, 4]
    for a, b in zip(single_rows, parallel_rows, strict=True):
        for key in ("loss", "grad_norm", "acc@1", "acceptance_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    for key in ("eval_loss", "eval_acceptance_length"):
        assert single_rows[-1][key] == pytest.approx(parallel_rows[-1][key], rel=1e-5), key
    checkpoints = sorted(p.name for p in (tmp_path / "parallel" / "checkpoints").iterdir())
    assert checkpoints == ["step-0000002", "step-0000004"]
    final = load_draft(tmp_path / "parallel").model.state_dict()
    reference = load_draft(tmp_path / "single").model.state_dict()
    assert final.keys() == reference.keys()
    for name in reference:
        assert torch.allclose(reference[name], final[name], atol=2e-5), name
    meta = json.loads((tmp_path / "parallel" / "spectool.json").read_text())
    assert meta["training"]["steps"] == 4 and meta["training"]["tokens"] == single.tokens  # fillers not counted


def test_two_processes_calibrate_dspark_on_the_whole_held_out_split(tiny_target_dir, tmp_path):
    """Each process evaluates half of the held-out split; the confidence temperatures are fitted on both halves
    (as many held-out blocks as one process sees alone), not on rank 0's share."""
    data = write_jsonl(tmp_path / "data.jsonl", conversations(16))  # 4 held-out examples: 2 per process
    options = dict(method="dspark", block_size=4, mask_token_id=6, num_anchors=6, max_steps=2, eval_fraction=0.25)
    train(make_config(tiny_target_dir, data, tmp_path / "single", **options))
    result = torchrun(cli_args(make_config(tiny_target_dir, data, tmp_path / "parallel", **options)), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    def summary(run):
        meta = json.loads((tmp_path / run / "spectool.json").read_text())["training"]
        temperatures = json.loads((tmp_path / run / "config.json").read_text())["confidence_temperatures"]
        return meta["confidence_calibration_blocks"], len(temperatures)

    assert summary("parallel") == summary("single")
    assert summary("single")[0] > 0


@pytest.mark.slow
def test_a_sharded_target_gives_every_method_the_loss_and_gradients_of_the_whole(tmp_path):
    """`shard_target_check.py` under torchrun: per method, loss, metrics and draft gradients with the target's
    layers sharded over 2 gloo processes equal those with the whole target (rtol 1e-5, atol 1e-6)."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command.append(str(Path(__file__).with_name("shard_target_check.py")))
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("ok ")] == [
        "eagle1", "eagle3", "dflash", "dspark"
    ]  # fmt: skip


def test_shard_target_needs_several_processes_and_a_running_target():
    from spectool.training.distributed import shard_frozen_target

    with pytest.raises(UsageError, match="torchrun"):
        shard_frozen_target(torch.nn.Linear(2, 2), DistributedContext())
