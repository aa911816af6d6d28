"""DFlash objective: anchor sampling rules, and the loss and metrics against a per-block plain loop."""

import math

import pytest
import torch

from spectool.training.objectives.base import Documents
from spectool.training.objectives.blocks import slot_labels
from tests.training.objectives.conftest import (
    block_hidden_alone,
    document_start,
    packed_batch,
    three_token_documents,
    three_token_head,
)
from tests.training.objectives.test_eagle1 import argmax, log_softmax

# The reference anchor rule (SpecForge `OnlineDFlashModel._sample_anchor_positions`, DeepSpec
# `build_anchor_candidate_mask`), per document: a may anchor a block when x_a and x_{a+1} are both labels
# (loss_mask[a] and loss_mask[a+1]). A block running past its document's (or the row's) end is cut, not skipped.
# Rows of length 18, block size 4 (conftest).
HAND_LOSS_MASK = [
    # document 0 = 0..8          | document 1 = 9..15   | padding
    [0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0],
    # document 0 = 0..5 | document 1 = 6..17, up to the end of the row
    [0, 1, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1],
    # one document of isolated labels: no anchor at all
    [1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0],
]
HAND_DOCUMENTS = [[9, 7], [6, 12], [12]]
HAND_ANCHORS = [
    # Not 4 (x_5 no label), 8 (x_9 is a label, but of the next document), 9 (x_10 no label), 15 (x_16 padding).
    # The blocks of 7 (7..10) and 14 (14..17) run past their document's end: cut, not skipped.
    {2, 3, 6, 7, 11, 12, 13, 14},
    # Not 1, 6, 11 (x_{a+1} no label), 5 (x_6 is a label, but of the next document), 17 (the row ends).
    # The blocks of 15 (15..18) and 16 (16..19) run past the end of the row: cut, not skipped.
    {8, 9, 10, 13, 14, 15, 16},
    set(),
]


@pytest.mark.parametrize("method", ["dflash", "dspark"])
def test_anchors_follow_the_reference_rule(objective_for, qwen3_target, method):
    objective = objective_for(method, num_anchors=6)
    assert objective.block_size == 4
    batch, _, document_ids = packed_batch(qwen3_target, objective, three_token_documents(HAND_DOCUMENTS), length=18)
    batch.loss_mask.copy_(torch.tensor(HAND_LOSS_MASK))
    generator = torch.Generator().manual_seed(0)
    seen = [set() for _ in HAND_ANCHORS]
    for _ in range(200):
        anchors, valid = objective.sample_anchors(batch, generator=generator, document_ids=document_ids)
        assert anchors.shape == valid.shape == (3, 6)
        for row, allowed in enumerate(HAND_ANCHORS):
            chosen = [a for a, v in zip(anchors[row].tolist(), valid[row].tolist(), strict=True) if v]
            assert len(chosen) == min(6, len(allowed))  # as many as allowed, without replacement
            assert chosen == sorted(set(chosen)) and set(chosen) <= allowed
            assert valid[row].tolist() == sorted(valid[row].tolist(), reverse=True)  # padding blocks last
            seen[row].update(chosen)
    assert seen == HAND_ANCHORS  # every allowed anchor gets drawn, no other
    replay = objective.sample_anchors(batch, generator=torch.Generator().manual_seed(5), document_ids=document_ids)
    again = objective.sample_anchors(batch, generator=torch.Generator().manual_seed(5), document_ids=document_ids)
    assert all(torch.equal(x, y) for x, y in zip(replay, again, strict=True))


@pytest.mark.parametrize("method", ["dflash", "dspark"])
def test_cut_blocks_train_a_documents_last_token_at_every_slot(objective_for, qwen3_target, method):
    """Over all the anchors drawn (num_anchors above the candidates: every one), a document's last label (its
    end-of-turn token: 8 and 15 in row 0, 17 in row 1 of HAND_LOSS_MASK) is supervised at every drafted slot, through
    blocks cut at the document or row end."""
    objective = objective_for(method, num_anchors=64)
    batch, _, document_ids = packed_batch(qwen3_target, objective, three_token_documents(HAND_DOCUMENTS), length=18)
    batch.loss_mask.copy_(torch.tensor(HAND_LOSS_MASK))
    docs = Documents.of(batch, document_ids)
    anchors, valid = objective.sample_anchors(
        batch, generator=torch.Generator().manual_seed(0), document_ids=document_ids
    )
    offsets = torch.arange(1, objective.block_size + (method == "dspark"))  # DFlash x_{a+1..a+B-1}, DSpark ..a+B
    _, supervised = slot_labels(batch.input_ids, batch.loss_mask, docs, anchors, valid, offsets)
    if method == "dspark":
        supervised = supervised.long().cumprod(-1).bool()  # DSpark trains the contiguous prefix only
    for row, last in ((0, 8), (0, 15), (1, 17)):
        slots = {
            int(offsets[k])
            for j, a in enumerate(anchors[row].tolist())
            for k in range(len(offsets))
            if supervised[row, j, k] and a + int(offsets[k]) == last
        }
        if (row, last) == (0, 8):  # x_5 is no label, so only anchors 6 and 7 reach x_8
            assert slots == {1, 2}
        else:
            assert slots == set(offsets.tolist())


@torch.no_grad()
def reference(draft, batch, document_ids, anchors, valid, embed, head, gamma):
    """Each block on its own; hard CE with Python arithmetic, slot weights exp(-(k-1)/gamma); per-slot hit rates
    (the draft's argmax against the target's greedy token there) and prefix hit rates over the blocks valid through
    each slot."""
    block = draft.config.block_size
    numerator = denominator = 0.0
    chain_valid, hits, prefix = [0] * (block - 1), [0] * (block - 1), [0] * (block - 1)
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
                greedy = argmax(head(batch.target_last_hidden_states[row, a + k - 1]).tolist())  # the target's token
                weight = math.exp(-(k - 1) / gamma)
                numerator += weight * -log_q[label]
                denominator += weight
                if in_chain:
                    all_hit = all_hit and argmax(log_q) == greedy
                    chain_valid[k - 1] += 1
                    hits[k - 1] += argmax(log_q) == greedy
                    prefix[k - 1] += all_hit
    accuracy = [h / max(v, 1) for h, v in zip(hits, chain_valid, strict=True)]
    prefix_rate = [p / max(v, 1) for p, v in zip(prefix, chain_valid, strict=True)]
    return numerator / denominator, accuracy, prefix_rate


def test_loss_and_metrics_match_a_per_block_loop(objective_for, qwen3_target):
    objective = objective_for("dflash", gamma=3.0)
    draft = objective.draft.eval()
    rows = three_token_documents([[12, 10], [16]])
    batch, position_ids, document_ids = packed_batch(qwen3_target, objective, rows, length=24)
    # Row 0: documents 0..11 and 12..21; anchor 10's block runs past its document (slots 2, 3 invalid).
    # Row 1: anchor 2's first slot is no label (prompt), its later ones are; one padding block.
    anchors = torch.tensor([[4, 8, 10, 16, 18], [2, 4, 9, 12, 0]])
    valid = torch.tensor([[True] * 5, [True] * 4 + [False]])
    head, embed = three_token_head(seed=3), qwen3_target.get_input_embeddings()  # hits at some slots, not all
    out = objective.loss_at(
        batch,
        anchors,
        valid,
        target_lm_head=head,
        target_embed=embed,
        position_ids=position_ids,
        document_ids=document_ids,
    )
    loss, accuracy, prefix = reference(draft, batch, document_ids, anchors, valid, embed, head, 3.0)
    assert out.loss.item() == pytest.approx(loss, rel=1e-5) and out.metrics["ce"] == pytest.approx(loss, rel=1e-5)
    assert [out.metrics[f"acc@{k}"] for k in (1, 2, 3)] == pytest.approx(accuracy, abs=1e-6)
    assert [out.metrics[f"prefix@{k}"] for k in (1, 2, 3)] == pytest.approx(prefix, abs=1e-6)
    assert 0 < accuracy[0] < 1 and accuracy[0] == prefix[0] and accuracy != prefix
    assert out.metrics["acceptance_length"] == pytest.approx(1 + sum(prefix), abs=1e-6)
    assert out.metrics["anchors"] == 9
    assert out.num_supervised == 9 * 3 - 2 - 1  # anchor 10 loses 2 slots, anchor 2 loses 1
    assert document_start(document_ids, 0, 18) == 12


def test_blocks_cut_at_a_document_and_at_the_row_end(objective_for, qwen3_target):
    """Anchors the reference rule allows near the ends: their blocks are cut, and the loss still matches the loop."""
    objective = objective_for("dflash", gamma=3.0)
    draft = objective.draft.eval()
    batch, position_ids, document_ids = packed_batch(qwen3_target, objective, three_token_documents([[10, 14]]), 24)
    # Document 0 = 0..9, document 1 = 10..23 (no padding). Anchor 8's block 8..11 keeps slot 1 (x_9); anchor 20's
    # block fits; anchor 22's block 22..25 runs past the row and keeps slot 1 (x_23).
    anchors, valid = torch.tensor([[8, 20, 22]]), torch.ones(1, 3, dtype=torch.bool)
    assert objective.sample_anchors(batch, document_ids=document_ids)[1].sum() == 5 + 9  # 4..8 and 14..22
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
    loss, accuracy, prefix = reference(draft, batch, document_ids, anchors, valid, embed, head, 3.0)
    assert out.loss.item() == pytest.approx(loss, rel=1e-5)
    assert [out.metrics[f"acc@{k}"] for k in (1, 2, 3)] == pytest.approx(accuracy, abs=1e-6)
    assert [out.metrics[f"prefix@{k}"] for k in (1, 2, 3)] == pytest.approx(prefix, abs=1e-6)
    assert out.num_supervised == 1 + 3 + 1
