"""DFlash objective: anchor sampling rules, and the loss and metrics against a per-block plain loop."""

import math

import pytest
import torch

from tests.training.objectives.conftest import (
    block_hidden_alone,
    document_start,
    packed_batch,
    three_token_documents,
    three_token_head,
)
from tests.training.objectives.test_eagle1 import argmax, log_softmax


@pytest.mark.parametrize("method", ["dflash", "dspark"])
def test_anchor_sampling_obeys_every_rule(objective_for, qwen3_target, method):
    objective = objective_for(method, num_anchors=6)
    block = objective.block_size
    rows = three_token_documents([[9, 3, 8], [14], [3, 3, 2], [2]])
    batch, _, document_ids = packed_batch(qwen3_target, objective, rows, length=22, prompt=1)
    batch.loss_mask[0, 6] = 0  # a hole inside a document
    labels, documents = batch.loss_mask.tolist(), document_ids.tolist()
    seq = batch.input_ids.shape[1]

    def allowed(row, a):
        inside = a + block <= seq and all(documents[row][a + k] == documents[row][a] >= 0 for k in range(block))
        nexts = method == "dflash" or (a + 1 < seq and labels[row][a + 1] == 1)
        return inside and labels[row][a] == 1 and nexts

    candidates = [{a for a in range(seq) if allowed(row, a)} for row in range(len(rows))]
    assert candidates[2] == candidates[3] == set() and len(candidates[1]) > 6  # a row with no anchor at all
    generator = torch.Generator().manual_seed(0)
    seen = [set() for _ in rows]
    for _ in range(200):
        anchors, valid = objective.sample_anchors(batch, generator=generator, document_ids=document_ids)
        assert anchors.shape == valid.shape == (len(rows), 6)
        for row in range(len(rows)):
            chosen = [a for a, v in zip(anchors[row].tolist(), valid[row].tolist(), strict=True) if v]
            assert len(chosen) == min(6, len(candidates[row]))  # as many as allowed, without replacement
            assert chosen == sorted(set(chosen)) and set(chosen) <= candidates[row]
            assert valid[row].tolist() == sorted(valid[row].tolist(), reverse=True)  # padding blocks last
            seen[row].update(chosen)
    assert seen == candidates  # every allowed anchor gets drawn
    replay = objective.sample_anchors(batch, generator=torch.Generator().manual_seed(5), document_ids=document_ids)
    again = objective.sample_anchors(batch, generator=torch.Generator().manual_seed(5), document_ids=document_ids)
    assert all(torch.equal(x, y) for x, y in zip(replay, again, strict=True))


@torch.no_grad()
def reference(draft, batch, document_ids, anchors, valid, embed, head, gamma):
    """Each block on its own; hard CE with Python arithmetic, slot weights exp(-(k-1)/gamma), prefix hits."""
    block = draft.config.block_size
    numerator = denominator = 0.0
    chain_valid, prefix = [0] * (block - 1), [0] * (block - 1)
    for row in range(anchors.shape[0]):
        for a, ok in zip(anchors[row].tolist(), valid[row].tolist(), strict=True):
            if not ok:
                continue
            hidden = block_hidden_alone(draft, batch, document_ids, row, a, embed)
            end = a
            while end + 1 < batch.input_ids.shape[1] and document_ids[row, end + 1] == document_ids[row, a]:
                end += 1
            in_chain = all_hit = True
            for k in range(1, block):
                is_valid = a + k <= end and bool(batch.loss_mask[row, a + k])
                in_chain = in_chain and is_valid
                if not is_valid:
                    continue
                label = int(batch.input_ids[row, a + k])
                log_q = log_softmax(head(hidden[k]).tolist())
                weight = math.exp(-(k - 1) / gamma)
                numerator += weight * -log_q[label]
                denominator += weight
                if in_chain:
                    all_hit = all_hit and argmax(log_q) == label
                    chain_valid[k - 1] += 1
                    prefix[k - 1] += all_hit
    accuracy = [p / max(v, 1) for p, v in zip(prefix, chain_valid, strict=True)]
    return numerator / denominator, accuracy


def test_loss_and_metrics_match_a_per_block_loop(objective_for, qwen3_target):
    objective = objective_for("dflash", gamma=3.0)
    draft = objective.draft.eval()
    rows = three_token_documents([[12, 10], [16]])
    batch, position_ids, document_ids = packed_batch(qwen3_target, objective, rows, length=24)
    # Row 0: documents 0..11 and 12..21; anchor 10's block runs past its document (slots 2, 3 invalid).
    # Row 1: anchor 2's first slot is no label (prompt), its later ones are; one padding block.
    anchors = torch.tensor([[4, 8, 10, 16, 18], [2, 4, 9, 12, 0]])
    valid = torch.tensor([[True] * 5, [True] * 4 + [False]])
    head, embed = three_token_head(), qwen3_target.get_input_embeddings()
    out = objective.loss_at(
        batch,
        anchors,
        valid,
        target_lm_head=head,
        target_embed=embed,
        position_ids=position_ids,
        document_ids=document_ids,
    )
    loss, accuracy = reference(draft, batch, document_ids, anchors, valid, embed, head, 3.0)
    assert out.loss.item() == pytest.approx(loss, rel=1e-5) and out.metrics["ce"] == pytest.approx(loss, rel=1e-5)
    assert [out.metrics[f"acc@{k}"] for k in (1, 2, 3)] == pytest.approx(accuracy, abs=1e-6)
    assert 0 < accuracy[0] < 1
    assert out.metrics["acceptance_length"] == pytest.approx(1 + sum(accuracy), abs=1e-6)
    assert out.metrics["anchors"] == 9
    assert out.num_supervised == 9 * 3 - 2 - 1  # anchor 10 loses 2 slots, anchor 2 loses 1
    assert document_start(document_ids, 0, 18) == 12
