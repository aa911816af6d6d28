"""Training runs the target in the dtype `spectool.hardware` chooses and keeps the draft's weights in fp32."""

from __future__ import annotations

import math

import pytest
import torch

from spectool import hardware
from spectool.checkpoint import load_draft
from spectool.training.trainer import Trainer
from tests.training.conftest import write_jsonl
from tests.training.test_trainer import METHOD_OPTIONS, conversations, make_config, rows


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
@pytest.mark.parametrize("amx", [True, False])
def test_an_fp32_draft_trains_against_the_target_in_the_chosen_dtype(
    method, amx, tiny_target_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(hardware, "cpu_multiplies_bf16", lambda: amx)
    data_file = write_jsonl(tmp_path / "data.jsonl", conversations(16))
    trainer = Trainer(make_config(tiny_target_dir, data_file, tmp_path / "out", max_steps=3, **METHOD_OPTIONS[method]))
    trainer.run()
    assert trainer.target_model.dtype == (torch.bfloat16 if amx else torch.float32)
    described = trainer.describe()  # what `spectool train` prints at the start
    assert (described["target_dtype"], described["draft_dtype"]) == ("bfloat16" if amx else "float32", "float32")
    assert all(p.dtype == torch.float32 for p in trainer.draft.parameters())
    losses = [row["loss"] for row in rows(tmp_path / "out")]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_training_on_cuda_runs_the_target_in_bf16_and_the_draft_under_autocast(method, tiny_target_dir, tmp_path):
    data_file = write_jsonl(tmp_path / "data.jsonl", conversations(16))
    config = make_config(
        tiny_target_dir, data_file, tmp_path / "out", max_steps=3, device="cuda", **METHOD_OPTIONS[method]
    )
    trainer = Trainer(config)
    trainer.run()
    assert trainer.target_model.dtype == torch.bfloat16 and trainer.autocast_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and p.is_cuda for p in trainer.draft.parameters())  # fp32 master weights
    losses = [row["loss"] for row in rows(tmp_path / "out")]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert load_draft(tmp_path / "out").method == method  # the final draft loads (on the CPU)
