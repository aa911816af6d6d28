"""The objectives' vocabulary-sized work, split into chunks, runs once per scored row (no recomputation)."""

import pytest
import torch

from tests.training.objectives.conftest import capture, run


@pytest.mark.parametrize("method", ["eagle1", "eagle3", "dflash", "dspark"])
def test_objectives_project_each_row_once_when_chunked(method, objective_for, qwen3_target, greedy_data, monkeypatch):
    """With the vocabulary work split into chunks, every objective takes each chunk's gradient in the forward
    pass: the backward pass projects nothing again (activation checkpointing would run every chunk twice), and the
    block objectives send every supervised row through each projection once (DFlash's hit metric adds the target's
    choice at each distinct position, without gradients)."""
    from spectool.training.objectives import base

    monkeypatch.setattr(base, "VOCAB_CHUNK_ELEMENTS", 3 * qwen3_target.config.vocab_size)
    objective = objective_for(method)
    batch = capture(qwen3_target, objective, *greedy_data)
    heads = [qwen3_target.lm_head] + ([objective.draft.lm_head] if method in ("eagle3", "dspark") else [])
    rows = {id(head): 0 for head in heads}

    def count(head, args, output):
        rows[id(head)] += output.reshape(-1, output.shape[-1]).shape[0]

    hooks = [head.register_forward_hook(count) for head in heads]
    try:
        out = run(objective, batch, qwen3_target, generator=torch.Generator().manual_seed(0))
        forward_rows = dict(rows)
        out.loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    assert out.num_supervised > 3
    assert rows == forward_rows  # nothing projected again in backward
    assert rows[id(heads[-1])] >= out.num_supervised
    if method == "dspark":
        for head in heads:
            assert rows[id(head)] == out.num_supervised, head
    if method == "dflash":  # and, without gradients, each distinct position a slot's token follows (the metric)
        assert out.num_supervised < rows[id(qwen3_target.lm_head)] <= 2 * out.num_supervised


def test_weighted_row_chunks_equal_the_weighted_mean_and_its_gradients(monkeypatch):
    """Values, outputs and gradients (rows and parameters) of `weighted_row_chunks` equal the one-piece
    computation, with and without gradients."""
    from spectool.training.objectives import base

    monkeypatch.setattr(base, "VOCAB_CHUNK_ELEMENTS", 3 * 7)  # 3 rows per chunk
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 7, bias=False)
    rows, labels, weights = torch.randn(8, 4), torch.randint(0, 7, (8,)), torch.rand(8)

    def terms(hidden, tokens):
        logits = head(hidden)
        return torch.nn.functional.cross_entropy(logits, tokens, reduction="none"), logits.square().sum(-1)

    hidden = rows.clone().requires_grad_(True)
    ce, square = terms(hidden, labels)
    expected = 0.5 * base.weighted_mean(ce, weights) + 2.0 * base.weighted_mean(square, weights)
    expected.backward()
    want = (hidden.grad.clone(), head.weight.grad.clone())
    hidden.grad, head.weight.grad = None, None
    loss, got_ce, got_square = base.weighted_row_chunks(
        terms, hidden, labels, weights=weights, scales=(0.5, 2.0), params=(head.weight,), width=7
    )
    (3 * loss).backward()
    assert torch.allclose(loss, expected) and torch.allclose(got_ce, ce) and torch.allclose(got_square, square)
    assert not got_ce.requires_grad
    assert torch.allclose(hidden.grad, 3 * want[0], atol=1e-6) and torch.allclose(head.weight.grad, 3 * want[1])
    with torch.no_grad():
        plain, *_ = base.weighted_row_chunks(terms, hidden, labels, weights=weights, scales=(0.5, 2.0), width=7)
    assert torch.allclose(plain, expected)
