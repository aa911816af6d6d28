"""EAGLE-3 objective: TTT loss and metrics against a plain loop, the step shift, the t2d mask, vocabulary pruning."""

import math

import pytest
import torch

from spectool.errors import UsageError
from spectool.target import TargetBatch
from spectool.training.objectives import build_draft_vocab, count_supervised_tokens
from spectool.training.objectives.base import Documents
from spectool.training.objectives.eagle3 import ttt_loss_masks
from tests.training.objectives.conftest import capture, packed_batch, run
from tests.training.objectives.test_eagle1 import argmax, log_softmax

STEPS = 3


def test_ttt_loss_masks_shift_one_more_position_per_step_and_apply_t2d():
    loss_mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    in_draft_vocab = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    batch = TargetBatch(loss_mask, loss_mask, torch.zeros(2, 6, 0), torch.zeros(2, 6, 0))
    docs = Documents.of(batch, torch.tensor([[0] * 6, [0, 0, 0, 1, 1, 1]]))
    masks = ttt_loss_masks(loss_mask, docs, 2, in_draft_vocab).int().tolist()
    # step 0, position t: label x_{t+2} and t2d[argmax target logits at t+1]; step 1: x_{t+3} and t+2.
    assert masks[0] == [[1, 0, 1, 0, 0, 0], [1, 0, 0, 1, 0, 0]]  # row 1: t=1, 2 would cross into document 1
    assert masks[1] == [[0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    assert ttt_loss_masks(loss_mask, docs, 1)[0].int().tolist()[0] == [1, 1, 1, 0, 0, 0]


def test_build_draft_vocab_by_hand():
    counts = torch.tensor([3, 0, 5, 3, 1])
    assert build_draft_vocab(counts, 3).tolist() == [0, 2, 3]
    assert build_draft_vocab(counts, 2).tolist() == [0, 2]  # ids 0 and 3 tie at 3: the lower id wins
    assert build_draft_vocab(torch.tensor([0, 2, 0, 0]), 3).tolist() == [0, 1, 2]  # unseen tokens fill by lowest id
    with pytest.raises(UsageError, match="draft_vocab_size"):
        build_draft_vocab(counts, 6)


def test_count_supervised_tokens_counts_labels_only():
    batches = [
        (torch.tensor([[4, 1, 1, 2]]), torch.tensor([[0, 1, 1, 1]])),
        (torch.tensor([[4, 4, 0]]), torch.tensor([[1, 0, 1]])),
    ]
    assert count_supervised_tokens(batches, 5).tolist() == [1, 2, 1, 0, 1]
    with pytest.raises(UsageError, match=r"\[0, 3\)"):
        count_supervised_tokens(batches, 3)


@torch.no_grad()
def reference(draft, batch, decay):
    """Plain loops over rows, positions and steps: soft CE in Python arithmetic, chains of greedy hits."""
    out = draft.ttt_forward(
        torch.cat((batch.input_ids[:, 1:], batch.input_ids[:, :1] * 0), 1),
        batch.target_hidden_states,
        ttt_steps=STEPS,
        attention_mask=batch.attention_mask,
    )
    selected = draft.draft_to_target(torch.arange(draft.config.draft_vocab_size)).tolist()
    in_vocab = set(selected)
    ces = [[] for _ in range(STEPS)]
    valid, hits, prefix = [0] * STEPS, [0] * STEPS, [0] * STEPS
    for b in range(batch.input_ids.shape[0]):
        length = int(batch.attention_mask[b].sum())
        labels = batch.loss_mask[b].tolist()
        for t in range(length):
            all_hit, chain = True, True
            for step in range(STEPS):
                label_at = t + 2 + step
                if label_at >= length or not labels[label_at]:
                    chain = False
                    continue
                full = batch.target_logits[b, t + 1 + step].tolist()
                drafted = out.logits[step][b, t].tolist()
                if argmax(full) in in_vocab:
                    probs = [math.exp(v) for v in log_softmax([full[i] for i in selected])]
                    ces[step].append(-sum(p * q for p, q in zip(probs, log_softmax(drafted), strict=True)))
                if chain:
                    hit = selected[argmax(drafted)] == argmax(full)
                    all_hit = all_hit and hit
                    valid[step] += 1
                    hits[step] += hit
                    prefix[step] += all_hit
    step_losses = [sum(c) / len(c) for c in ces]
    weights = [decay**i for i in range(STEPS)]
    return {
        "loss": sum(w * s for w, s in zip(weights, step_losses, strict=True)) / sum(weights),
        "ce": step_losses,
        "num_supervised": len(ces[0]),
        "acc": [h / v for h, v in zip(hits, valid, strict=True)],
        "prefix": [p / v for p, v in zip(prefix, valid, strict=True)],
        "acceptance_length": 1 + sum(p / v for p, v in zip(prefix, valid, strict=True)),
    }


@pytest.mark.parametrize("draft_vocab_size", [None, 128])
def test_loss_and_metrics_match_a_plain_loop(objective_for, qwen3_target, greedy_data, draft_vocab_size):
    objective = objective_for("eagle3", {"draft_vocab_size": draft_vocab_size}, ttt_steps=STEPS, step_decay=0.5)
    draft = objective.draft.eval()
    ids, attention_mask, loss_mask = greedy_data
    if draft_vocab_size:
        # Leave the 3 most frequent labels out of the draft vocabulary so that t2d masks some positions.
        frequent = build_draft_vocab(count_supervised_tokens([(ids, loss_mask)], 256), 3).tolist()
        draft.set_vocab_mapping(torch.tensor([i for i in range(256) if i not in frequent][:draft_vocab_size]))
        draft.init_lm_head_from_target(qwen3_target.lm_head.weight)
    batch = capture(qwen3_target, objective, ids, attention_mask, loss_mask)
    # Make the target agree with the draft's first step at random positions, so hits are neither all 0 nor all 1.
    with torch.no_grad():
        first = draft.ttt_forward(
            torch.cat((ids[:, 1:], ids[:, :1] * 0), 1), batch.target_hidden_states, ttt_steps=1
        ).logits[0]
        agree = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.5
        tokens = draft.draft_to_target(first.argmax(-1))[:, :-1]
        boost = torch.zeros_like(batch.target_logits)
        boost[:, 1:].scatter_(-1, tokens[..., None], 50 * agree[:, 1:, None].float())
        batch.target_logits = batch.target_logits + boost
    out = run(objective, batch, qwen3_target)
    expected = reference(draft, batch, 0.5)
    assert out.num_supervised == expected["num_supervised"]
    assert out.loss.item() == pytest.approx(expected["loss"], rel=1e-5)
    for k in range(STEPS):
        assert out.metrics[f"ce@{k + 1}"] == pytest.approx(expected["ce"][k], rel=1e-5)
        assert out.metrics[f"acc@{k + 1}"] == pytest.approx(expected["acc"][k], abs=1e-6)
        assert out.metrics[f"prefix@{k + 1}"] == pytest.approx(expected["prefix"][k], abs=1e-6)
    assert out.metrics["acceptance_length"] == pytest.approx(expected["acceptance_length"], abs=1e-6)
    assert 0 < out.metrics["acc@1"] < 1
    assert (out.num_supervised < 34) == bool(draft_vocab_size)  # 34 positions have a label 2 tokens ahead


def test_target_logits_are_computed_when_not_captured(objective_for, qwen3_target, greedy_data):
    objective = objective_for("eagle3", ttt_steps=2)
    batch = capture(qwen3_target, objective, *greedy_data)
    with_logits = run(objective, batch, qwen3_target)
    batch.target_logits = None
    assert run(objective, batch, qwen3_target).metrics == pytest.approx(with_logits.metrics)


def test_packed_rows_equal_one_document_per_row(objective_for, qwen3_target, greedy_data):
    """Per-document causal attention in the TTT unroll: packing two documents into one row changes nothing."""
    objective = objective_for("eagle3", ttt_steps=3)
    objective.draft.eval()
    ids = greedy_data[0]
    documents = [ids[0, :12], ids[1, :10]]
    outputs = []
    for rows in ([documents], [[documents[0]], [documents[1]]]):
        batch, position_ids, document_ids = packed_batch(qwen3_target, objective, rows, 24)
        outputs.append(run(objective, batch, qwen3_target, position_ids=position_ids, document_ids=document_ids))
    packed, separate = outputs
    assert packed.num_supervised == separate.num_supervised == (12 - 4) + (10 - 4)  # x_{t+2} a label
    assert packed.loss.item() == pytest.approx(separate.loss.item(), rel=1e-5)
    assert packed.metrics == pytest.approx(separate.metrics, rel=1e-5)
