"""Shared objective helpers against hand-written values, and the objective factory."""

import math

import pytest
import torch

from spectool.errors import UsageError
from spectool.registry import get
from spectool.target import TargetBatch
from spectool.training.objectives import Documents, default_gamma, make_objective
from spectool.training.objectives.base import (
    chain_statistics,
    expected_prefix_survival,
    shift_left,
    soft_cross_entropy,
    weighted_mean,
)
from tests.training.objectives.conftest import make_draft


def batch_of(input_ids, attention_mask=None):
    empty = torch.zeros(*input_ids.shape, 0)
    return TargetBatch(input_ids, torch.ones_like(input_ids), empty, empty, attention_mask)


def test_documents_from_packed_ids_and_from_padding():
    ids = torch.zeros(2, 7, dtype=torch.long)
    packed = Documents.of(batch_of(ids), torch.tensor([[0, 0, 0, 1, 1, 2, -1], [0, 0, 0, 0, 0, 0, 0]]))
    assert packed.span_end.tolist() == [[2, 2, 2, 4, 4, 5, 6], [6] * 7]
    assert packed.within(1).tolist() == [
        [True, True, False, True, False, False, False],
        [True, True, True, True, True, True, False],
    ]
    assert packed.is_packed()
    padded = Documents.of(batch_of(ids, torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1] * 7])))
    assert padded.ids.tolist() == [[0, 0, 0, 0, 0, -1, -1], [0] * 7]
    assert padded.within(4).tolist()[0] == [True, False, False, False, False, False, False]
    assert not padded.is_packed()


def test_document_causal_mask_stays_in_the_document_and_keeps_the_diagonal():
    docs = Documents.of(batch_of(torch.zeros(1, 5, dtype=torch.long)), torch.tensor([[0, 0, 1, 1, -1]]))
    expected = [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1],  # padding keeps only itself
    ]
    assert docs.causal_mask()[0, 0].int().tolist() == expected


def test_shift_left_pads_the_tail():
    x = torch.tensor([[1, 2, 3, 4]])
    assert shift_left(x, 1, -1).tolist() == [[2, 3, 4, -1]]
    assert shift_left(x, 6, 0).tolist() == [[0, 0, 0, 0]]


def test_soft_cross_entropy_and_weighted_mean_by_hand():
    # softmax([0, ln 3]) = [1/4, 3/4]; against p = [1/2, 1/2]: -(ln(1/4) + ln(3/4)) / 2
    ce = soft_cross_entropy(torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.5, 0.5]]))
    assert ce.item() == pytest.approx(-(math.log(0.25) + math.log(0.75)) / 2, rel=1e-6)
    assert weighted_mean(torch.tensor([1.0, 4.0]), torch.tensor([3.0, 1.0])).item() == pytest.approx(7 / 4)
    empty = torch.zeros(0, requires_grad=True)
    zero = weighted_mean(empty, torch.zeros(0))
    zero.backward()
    assert zero.item() == 0.0 and not torch.isnan(zero)


def test_chain_statistics_by_hand():
    hits = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 0, 1]], dtype=torch.bool)
    accuracy, prefix, counts = chain_statistics(hits, valid)
    # chains valid through k: 4, 3, 3; hits among them: 3, 2 (rows 0, 2), 2 (rows 1, 2); all-hit prefixes: 3, 1, 0
    assert counts.tolist() == [4, 3, 3]
    assert accuracy.tolist() == pytest.approx([3 / 4, 2 / 3, 2 / 3])
    assert prefix.tolist() == pytest.approx([3 / 4, 1 / 3, 0.0])


def test_expected_prefix_survival_by_hand():
    accept = torch.tensor([[0.5, 0.5], [1.0, 0.2], [0.8, 0.9]])
    valid = torch.tensor([[1, 1], [1, 1], [1, 0]], dtype=torch.bool)
    # k=1: mean(0.5, 1.0, 0.8); k=2: mean(0.25, 0.2) over the two chains valid through 2
    assert expected_prefix_survival(accept, valid).tolist() == pytest.approx([2.3 / 3, 0.225])


def test_default_gamma_hits_the_published_values_and_interpolates():
    assert [default_gamma(n) for n in (7, 9, 15)] == [4.0, 5.0, 7.0]  # DFlash B=8/10/16, DSpark B=7
    assert default_gamma(8) == 4.5 and default_gamma(1) == 1.0 and default_gamma(12) == 6.0
    assert default_gamma(31) == pytest.approx(5 + 22 / 3)


def test_make_objective_checks_method_options_and_draft(qwen3_target):
    draft = make_draft("dflash", qwen3_target)
    objective = make_objective("dflash", draft, num_anchors=8)
    assert objective.num_anchors == 8 and objective.gamma == 2.0  # B=4: 3 drafts
    assert objective.target_layer_ids == [1, 2] and not objective.needs_target_logits
    with pytest.raises(UsageError, match="choose one of eagle1, eagle3, dflash, dspark"):
        make_objective("medusa", draft)
    with pytest.raises(UsageError, match="unknown dflash objective option.*ttt_steps.*accepted: num_anchors, gamma"):
        make_objective("dflash", draft, ttt_steps=3)
    with pytest.raises(UsageError, match="trains a Qwen3DSparkModel"):
        make_objective("dspark", draft)
    with pytest.raises(UsageError, match="gamma must be positive"):
        make_objective("dflash", draft, gamma=0)
    for method in ("eagle1", "eagle3", "dflash", "dspark"):
        assert get(method).objective_class().method == method
    assert make_objective("eagle1", make_draft("eagle1", qwen3_target)).target_layer_ids == []
    assert make_objective("eagle3", make_draft("eagle3", qwen3_target)).needs_target_logits
