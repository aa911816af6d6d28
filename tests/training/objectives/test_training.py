"""Every objective trains its draft: the loss falls and the acceptance length rises when overfitting one batch;
gradients reach exactly the trainable parameters; batches without a single supervised prediction stay finite."""

import math

import pytest
import torch

from spectool.registry import method_names
from tests.training.objectives.conftest import capture, run

METHODS = method_names()
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


@pytest.mark.parametrize("method", [*METHODS, "eagle3-pruned"])
def test_vocabulary_chunks_give_the_same_loss_metrics_and_gradients(
    method, objective_for, qwen3_target, greedy_data, monkeypatch
):
    """With a chunk budget of a few rows (the vocabulary-sized work split and recomputed in backward), every
    objective returns the loss, metrics and gradients of the one-piece computation."""
    from spectool.training.objectives import base

    options = {"draft_vocab_size": 100} if method == "eagle3-pruned" else {}
    method = method.removesuffix("-pruned")
    results = []
    for budget in (base.VOCAB_CHUNK_ELEMENTS, 3 * qwen3_target.config.vocab_size):
        monkeypatch.setattr(base, "VOCAB_CHUNK_ELEMENTS", budget)
        objective = objective_for(method, options, **HPARAMS[method])
        if options:
            objective.draft.set_vocab_mapping(torch.arange(0, 200, 2))
        out, parameters = gradients(objective, capture(qwen3_target, objective, *greedy_data), qwen3_target)
        grads = {name: p.grad.clone() for name, p in parameters.items() if p.grad is not None}
        results.append((out, grads))
    (whole, whole_grads), (chunked, chunked_grads) = results
    assert chunked.num_supervised == whole.num_supervised > 3
    assert torch.allclose(chunked.loss, whole.loss, rtol=1e-5, atol=1e-7)
    assert chunked.metrics.keys() == whole.metrics.keys()
    for key, value in whole.metrics.items():
        assert chunked.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert chunked_grads.keys() == whole_grads.keys() and whole_grads
    for name, grad in whole_grads.items():
        assert torch.allclose(chunked_grads[name], grad, rtol=1e-4, atol=1e-7), name


def test_map_row_chunks_checkpoints_only_with_gradients(monkeypatch):
    """Chunks stitch back in row order, and without gradients nothing is checkpointed."""
    from spectool.training.objectives import base

    monkeypatch.setattr(base, "VOCAB_CHUNK_ELEMENTS", 20)
    calls = []

    def fn(rows, offsets):
        calls.append(rows.shape[0])
        return (rows * rows + offsets, (rows > 3).long())

    rows, offsets = torch.arange(11.0), torch.ones(11)
    squared, flags = base.map_row_chunks(fn, rows, offsets, width=4)  # 5 rows per chunk
    assert calls == [5, 5, 1]
    assert squared.tolist() == (rows * rows + 1).tolist() and flags.tolist() == (rows > 3).long().tolist()
    weight = torch.ones(11, requires_grad=True)
    calls.clear()
    out, _ = base.map_row_chunks(fn, rows * weight, offsets, width=4)
    out.sum().backward()
    assert calls[:3] == [5, 5, 1] and sorted(calls[3:]) == [1, 5, 5]  # each chunk recomputed once in backward
    assert weight.grad.tolist() == [2.0 * i * i for i in range(11)]
