"""DSpark objective: CE / L1 / confidence terms, accept rates and tau against a per-block plain loop."""

import math

import pytest
import torch

from tests.training.objectives.conftest import (
    block_hidden_alone,
    packed_batch,
    three_token_documents,
    three_token_head,
)
from tests.training.objectives.test_eagle1 import argmax, log_softmax

GAMMA = 2.5


def bce_with_logits(z, y):
    return max(z, 0.0) - z * y + math.log1p(math.exp(-abs(z)))


@torch.no_grad()
def reference(draft, batch, document_ids, anchors, valid, head):
    """Each block on its own, every term in Python arithmetic over the contiguous supervised prefix."""
    block = draft.config.block_size
    sums = {"ce": 0.0, "l1": 0.0, "conf": 0.0, "weight": 0.0}
    accept_sum, survival_sum, counts, hits, prefix = ([0.0] * block for _ in range(5))
    for row in range(anchors.shape[0]):
        for a, ok in zip(anchors[row].tolist(), valid[row].tolist(), strict=True):
            if not ok:
                continue
            hidden = block_hidden_alone(draft, batch, document_ids, row, a, draft.embed_tokens)
            survival, all_hit = 1.0, True
            for k in range(block):
                target_at = a + k + 1
                same_document = (
                    target_at < batch.input_ids.shape[1] and document_ids[row, target_at] == document_ids[row, a]
                )
                if not (same_document and batch.loss_mask[row, target_at]):
                    break  # the supervised prefix ends
                label, prev = int(batch.input_ids[row, target_at]), batch.input_ids[row, a + k].view(1)
                log_q = log_softmax(draft.draft_logits(hidden[k : k + 1], prev)[0].tolist())
                teacher = [math.exp(v) for v in log_softmax(head(batch.target_last_hidden_states[row, a + k]).tolist())]
                l1 = sum(abs(math.exp(q) - p) for q, p in zip(log_q, teacher, strict=True))
                accept = min(max(1 - l1 / 2, 0.0), 1.0)
                confidence = float(draft.confidence_logits(hidden[k : k + 1], prev)[0])
                weight = math.exp(-k / GAMMA)
                sums["ce"] += weight * -log_q[label]
                sums["l1"] += weight * l1
                sums["conf"] += weight * bce_with_logits(confidence, accept)
                sums["weight"] += weight
                survival *= accept
                greedy = argmax(teacher)  # the target's own token: what verification accepts
                all_hit = all_hit and argmax(log_q) == greedy
                hits[k] += argmax(log_q) == greedy
                accept_sum[k] += accept
                survival_sum[k] += survival
                prefix[k] += all_hit
                counts[k] += 1
    terms = {name: sums[name] / sums["weight"] for name in ("ce", "l1", "conf")}
    return {
        **terms,
        "loss": 0.2 * terms["ce"] + 0.5 * terms["l1"] + 0.7 * terms["conf"],
        "accept_rate": [s / c for s, c in zip(accept_sum, counts, strict=True)],
        "acc": [h / c for h, c in zip(hits, counts, strict=True)],
        "prefix": [p / c for p, c in zip(prefix, counts, strict=True)],
        "tau": 1 + sum(s / c for s, c in zip(survival_sum, counts, strict=True)),
        "num_supervised": sum(counts),
    }


def test_loss_and_metrics_match_a_per_block_loop(objective_for, qwen3_target):
    objective = objective_for("dspark", gamma=GAMMA, ce_weight=0.2, l1_weight=0.5, confidence_weight=0.7)
    draft = objective.draft.eval()
    head = three_token_head(seed=1, bias=-3.0)
    with torch.no_grad():  # let the draft favour ids 0, 1, 2 too, so its greedy hits are not all misses
        draft.lm_head.weight[3:] = 0
        draft.markov_head.markov_w2.weight[3:] = 0
    rows = three_token_documents([[12, 10], [16]], seed=2)
    batch, position_ids, document_ids = packed_batch(qwen3_target, objective, rows, length=24)
    batch.loss_mask[1, 7] = 0
    # Row 0: anchor 8's last slot would predict x_12 of the next document; anchor 18 runs off document 1.
    # Row 1: anchor 5's slot 1 predicts the hole at 7, so only slot 0 is supervised; one padding block.
    anchors = torch.tensor([[4, 8, 16, 18], [5, 8, 11, 0]])
    valid = torch.tensor([[True] * 4, [True] * 3 + [False]])
    out = objective.loss_at(
        batch, anchors, valid, target_lm_head=head, position_ids=position_ids, document_ids=document_ids
    )
    expected = reference(draft, batch, document_ids, anchors, valid, head)
    metrics = out.metrics
    for name in ("ce", "l1", "conf", "loss"):
        assert metrics[name] == pytest.approx(expected[name], rel=1e-5), name
    assert out.loss.item() == pytest.approx(expected["loss"], rel=1e-5)
    for k in range(4):
        assert metrics[f"accept_rate@{k + 1}"] == pytest.approx(expected["accept_rate"][k], rel=1e-5)
        assert metrics[f"acc@{k + 1}"] == pytest.approx(expected["acc"][k], abs=1e-6)
        assert metrics[f"prefix@{k + 1}"] == pytest.approx(expected["prefix"][k], abs=1e-6)
    assert metrics["sampled_acceptance_length"] == pytest.approx(expected["tau"], rel=1e-5)
    assert metrics["acceptance_length"] == pytest.approx(1 + sum(expected["prefix"]), abs=1e-6)
    assert out.num_supervised == expected["num_supervised"] == 4 + 3 + 4 + 3 + 1 + 4 + 4
    assert 0 < expected["acc"][0] < 1 and 0.05 < expected["accept_rate"][0] < 0.95
    assert metrics["anchors"] == 7


def test_without_confidence_head_the_loss_has_no_conf_term(objective_for, qwen3_target, greedy_data):
    objective = objective_for("dspark", {"enable_confidence_head": False})
    batch = packed_batch(qwen3_target, objective, [[greedy_data[0][0]]], length=24)[0]
    out = objective(batch, target_lm_head=qwen3_target.lm_head, target_embed=None)
    assert "conf" not in out.metrics
    assert out.loss.item() == pytest.approx(0.1 * out.metrics["ce"] + 0.9 * out.metrics["l1"], rel=1e-6)


def test_blocks_cut_at_a_document_and_at_the_row_end(objective_for, qwen3_target):
    """Anchors the reference rule allows near the ends: their blocks are cut, and the loss still matches the loop."""
    objective = objective_for("dspark", gamma=GAMMA, ce_weight=0.2, l1_weight=0.5, confidence_weight=0.7)
    draft = objective.draft.eval()
    head = three_token_head(seed=1, bias=-3.0)
    batch, position_ids, document_ids = packed_batch(qwen3_target, objective, three_token_documents([[10, 14]]), 24)
    # Document 0 = 0..9, document 1 = 10..23 (no padding). Anchor 8 supervises slot 0 (x_9) only; anchor 19's block
    # predicts x_20..x_23; anchor 22 supervises slot 0 (x_23) only, its block running past the row.
    anchors, valid = torch.tensor([[8, 19, 22]]), torch.ones(1, 3, dtype=torch.bool)
    assert objective.sample_anchors(batch, document_ids=document_ids)[1].sum() == 5 + 9  # 4..8 and 14..22
    out = objective.loss_at(
        batch, anchors, valid, target_lm_head=head, position_ids=position_ids, document_ids=document_ids
    )
    expected = reference(draft, batch, document_ids, anchors, valid, head)
    for name in ("ce", "l1", "conf", "loss"):
        assert out.metrics[name] == pytest.approx(expected[name], rel=1e-5), name
    assert out.metrics["sampled_acceptance_length"] == pytest.approx(expected["tau"], rel=1e-5)
    assert out.metrics["acceptance_length"] == pytest.approx(1 + sum(expected["prefix"]), abs=1e-6)
    assert out.num_supervised == expected["num_supervised"] == 1 + 4 + 1
