"""build_draft: defaults, meta-device construction, dtype, and the errors a user can hit."""

import pytest
import torch

from spectool.drafts import GptOssEagle3DraftModel, build_draft, default_mask_token_id
from spectool.errors import SpectoolError, UsageError
from spectool.registry import get
from tests.conftest import tiny_qwen3_config

CASES = [
    ("eagle1", dict(target_layer_ids=None)),
    ("eagle3", dict(target_layer_ids=[0, 1, 2])),
    ("dflash", dict(target_layer_ids=[0, 2], block_size=4, mask_token_id=255)),
    ("dspark", dict(target_layer_ids=[1, 3], block_size=4, mask_token_id=255, markov_rank=8)),
]


@pytest.mark.parametrize(("method", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_meta_build_counts_the_same_parameters_without_allocating(method, kwargs, qwen3_config):
    real = build_draft(method, qwen3_config, **kwargs)
    meta = build_draft(method, qwen3_config, device="meta", **kwargs)
    assert isinstance(real, get(method).model_class(real.config))
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in real.parameters())
    assert sorted(meta.trainable_parameter_names() + meta.frozen_parameter_names()) == sorted(
        n for n, _ in meta.named_parameters()
    )


def test_defaults_follow_upstream():
    big_vocab = tiny_qwen3_config(vocab_size=151936)  # Qwen3's embedding size: mask token 151669
    assert default_mask_token_id(big_vocab) == 151669
    dflash = build_draft("dflash", big_vocab, target_layer_ids=[0, 1, 2], device="meta")
    assert dflash.config.block_size == 16 and dflash.config.num_hidden_layers == 3
    assert dflash.config.mask_token_id == 151669
    dspark = build_draft("dspark", big_vocab, target_layer_ids=[1, 3], device="meta")
    assert dspark.config.block_size == 7 and dspark.config.markov_rank == 256 and dspark.config.num_anchors == 512
    assert build_draft("eagle1", big_vocab, target_layer_ids=[3], device="meta").config.num_hidden_layers == 1
    assert build_draft("eagle3", big_vocab, target_layer_ids=[0, 1, 2], device="meta").config.num_hidden_layers == 1
    assert (
        build_draft(
            "dflash", big_vocab, target_layer_ids=[0, 2], num_draft_layers=1, device="meta"
        ).config.num_hidden_layers
        == 1
    )


def test_dtype(qwen3_config):
    draft = build_draft("eagle3", qwen3_config, target_layer_ids=[0, 1, 2], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in draft.parameters())


def test_gpt_oss_dispatch(gpt_oss_config):
    assert isinstance(build_draft("eagle3", gpt_oss_config, target_layer_ids=[0, 1, 2]), GptOssEagle3DraftModel)


@pytest.mark.parametrize(
    ("method", "kwargs", "error", "match"),
    [
        ("medusa", dict(target_layer_ids=[0]), UsageError, "unknown method"),
        ("eagle3", dict(target_layer_ids=[0, 1]), UsageError, "exactly 3"),
        ("eagle3", dict(target_layer_ids=[2, 1, 3]), UsageError, "strictly increasing"),
        ("dflash", dict(target_layer_ids=[0, 4], mask_token_id=1), UsageError, "outside"),
        ("eagle3", dict(target_layer_ids=[0, 1, 2], num_draft_layers=2), UsageError, "one decoder layer"),
        ("eagle1", dict(target_layer_ids=[1]), UsageError, "last hidden state"),
        ("dflash", dict(target_layer_ids=[0, 2], draft_vocab_size=10), UsageError, "does not apply to DFlash"),
        ("dflash", dict(target_layer_ids=[0, 2]), SpectoolError, "--mask-token-id"),
        ("dspark", dict(target_layer_ids=[0, 2], mask_token_id=999), SpectoolError, "outside the target vocabulary"),
        ("eagle3", dict(target_layer_ids=[0, 1, 2], draft_vocab_size=1000), SpectoolError, "draft_vocab_size"),
    ],
)
def test_user_errors(method, kwargs, error, match, qwen3_config):
    with pytest.raises(error, match=match):
        build_draft(method, qwen3_config, **kwargs)


def test_mask_token_may_not_be_a_special_token():
    with pytest.raises(SpectoolError, match="eos"):
        build_draft("dflash", tiny_qwen3_config(eos_token_id=5), target_layer_ids=[0, 2], mask_token_id=5)
