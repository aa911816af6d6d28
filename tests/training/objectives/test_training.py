"""Every objective trains its draft: the loss falls and the acceptance length rises when overfitting one batch;
gradients reach exactly the trainable parameters; batches without a single supervised prediction stay finite."""

import math

import pytest
import torch

from spectool.training.objectives import OBJECTIVES
from tests.training.objectives.conftest import capture, run

METHODS = list(OBJECTIVES)
HPARAMS = {"eagle1": {"chain_steps": 3}, "eagle3": {"ttt_steps": 3}, "dflash": {}, "dspark": {}}


@pytest.mark.parametrize("method", METHODS)
def test_overfitting_one_batch_lowers_the_loss_and_raises_acceptance(method, objective_for, sharp_target, greedy_data):
    objective = objective_for(method, target=sharp_target, **HPARAMS[method])
    draft = objective.draft.train()
    batch = capture(sharp_target, objective, *greedy_data)
    optimizer = torch.optim.AdamW(draft.trainable_parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    history = []
    for _ in range(40):
        out = run(objective, batch, sharp_target, generator=generator)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        history.append(out.metrics)
    first, last = history[0], run(objective, batch, sharp_target, generator=generator).metrics
    assert last["loss"] < 0.7 * first["loss"]
    assert last["acceptance_length"] > first["acceptance_length"] + 0.5


def gradients(objective, batch, target):
    draft = objective.draft.train()
    draft.zero_grad()
    out = run(objective, batch, target, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    return out, dict(draft.named_parameters())


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_trainable_parameters_only(method, objective_for, qwen3_target, greedy_data):
    objective = objective_for(method, **HPARAMS[method])
    out, parameters = gradients(objective, capture(qwen3_target, objective, *greedy_data), qwen3_target)
    frozen = set(objective.draft.frozen_parameter_names())
    assert frozen == {"eagle1": {"embed_tokens.weight"}, "dspark": {"embed_tokens.weight", "lm_head.weight"}}.get(
        method, set()
    )
    for name, parameter in parameters.items():
        if name in frozen:
            assert parameter.grad is None and not parameter.requires_grad, name
        else:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
            assert parameter.grad.abs().sum() > 0, name
    assert not any(p.requires_grad for p in qwen3_target.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_rows_or_batches_without_supervision_stay_finite(method, objective_for, qwen3_target, greedy_data):
    objective = objective_for(method, **HPARAMS[method])
    ids, attention_mask, loss_mask = greedy_data
    one_row = loss_mask.clone()
    one_row[1] = 0
    for labels, expect_zero in ((one_row, False), (torch.zeros_like(loss_mask), True)):
        out, parameters = gradients(
            objective, capture(qwen3_target, objective, ids, attention_mask, labels), qwen3_target
        )
        assert all(math.isfinite(value) for value in out.metrics.values()), out.metrics
        assert torch.isfinite(out.loss)
        for name, parameter in parameters.items():
            if parameter.grad is not None:
                assert torch.isfinite(parameter.grad).all(), name
        assert (out.num_supervised == 0) == expect_zero
        if expect_zero:
            assert out.loss.item() == 0.0 and out.metrics["acceptance_length"] == 1.0


@pytest.mark.parametrize("method", METHODS)
def test_loss_math_stays_float32_under_bf16_autocast(method, objective_for, qwen3_target, greedy_data):
    objective = objective_for(method, **HPARAMS[method])
    objective.draft.eval()
    batch = capture(qwen3_target, objective, *greedy_data)
    full = run(objective, batch, qwen3_target, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = run(objective, batch, qwen3_target, generator=torch.Generator().manual_seed(0))
    assert mixed.loss.dtype == torch.float32 and torch.isfinite(mixed.loss)
    assert mixed.loss.item() == pytest.approx(full.loss.item(), rel=0.05)
