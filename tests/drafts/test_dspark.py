"""DSpark draft: the DeepSpec layout of SPEC §5, frozen target copies, Markov and confidence heads."""

import json

import pytest
import torch
from safetensors.torch import load_file

from spectool.drafts import Qwen3DSparkModel, block_input_ids, block_position_ids, build_draft
from spectool.drafts.dspark import teacher_forced_prev_tokens
from spectool.errors import SpectoolError
from tests.drafts.test_dflash import dflash_keys

# SPEC §5, written out by hand: the DFlash keys plus these.
DSPARK_EXTRA_KEYS = {
    "embed_tokens.weight",
    "lm_head.weight",
    "markov_head.markov_w1.weight",
    "markov_head.markov_w2.weight",
    "confidence_head.proj.weight",
    "confidence_head.proj.bias",
}
RANK = 8


def make_draft(target_config, **kwargs):
    torch.manual_seed(0)
    options = dict(target_layer_ids=[1, 3], block_size=4, mask_token_id=255, markov_rank=RANK)
    options.update(kwargs)
    return build_draft("dspark", target_config, **options).eval()


@pytest.fixture
def draft(qwen3_config, qwen3_target):
    model = make_draft(qwen3_config)
    model.copy_target_weights(qwen3_target)
    return model


def test_saved_keys_shapes_and_config_follow_spec(tmp_path, draft):
    draft.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert set(tensors) == dflash_keys(2) | DSPARK_EXTRA_KEYS
    v, h = 256, 64
    assert tensors["embed_tokens.weight"].shape == (v, h) and tensors["lm_head.weight"].shape == (v, h)
    assert tensors["markov_head.markov_w1.weight"].shape == (v, RANK)
    assert tensors["markov_head.markov_w2.weight"].shape == (v, RANK)
    assert tensors["confidence_head.proj.weight"].shape == (1, h + RANK)
    assert tensors["confidence_head.proj.bias"].shape == (1,)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3DSparkModel"] and config["model_type"] == "qwen3"
    expected = {
        "block_size": 4,
        "target_layer_ids": [1, 3],
        "num_target_layers": 4,
        "mask_token_id": 255,
        "num_anchors": 512,
        "markov_rank": RANK,
        "markov_head_type": "vanilla",
        "enable_confidence_head": True,
        "confidence_head_with_markov": True,
    }
    assert {key: config[key] for key in expected} == expected


def test_target_copies_are_frozen_and_equal_to_the_target(tmp_path, draft, qwen3_target):
    assert torch.equal(draft.embed_tokens.weight, qwen3_target.get_input_embeddings().weight)
    assert torch.equal(draft.lm_head.weight, qwen3_target.lm_head.weight)
    assert draft.frozen_parameter_names() == ["embed_tokens.weight", "lm_head.weight"]
    assert not draft.embed_tokens.weight.requires_grad and not draft.lm_head.weight.requires_grad
    assert "markov_head.markov_w1.weight" in draft.trainable_parameter_names()
    assert all(p.requires_grad for p in draft.trainable_parameters())
    draft.save_pretrained(tmp_path)
    loaded = Qwen3DSparkModel.from_pretrained(tmp_path)
    for key, value in draft.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert not loaded.embed_tokens.weight.requires_grad and not loaded.lm_head.weight.requires_grad


def test_heads_teacher_forced_and_sampled_left_to_right(draft):
    generator = torch.Generator().manual_seed(4)
    context = torch.randn(1, 5, 128, generator=generator)
    anchor = torch.tensor([17])
    with torch.no_grad():
        hidden = draft(block_input_ids(anchor[:, None], 4, 255), target_hidden=context, position_ids=torch.arange(9))
        assert hidden.shape == (1, 4, 64)
        prev = torch.tensor([[17, 3, 99, 42]])
        logits = draft.draft_logits(hidden, prev)
        torch.testing.assert_close(
            logits, draft.lm_head(hidden) + draft.markov_head.markov_w2(draft.markov_head.markov_w1(prev))
        )
        confidence = draft.confidence_logits(hidden, prev)
        assert confidence.shape == (1, 4)
        torch.testing.assert_close(
            confidence, draft.confidence_head.proj(torch.cat((hidden, draft.markov_head.markov_w1(prev)), -1))[..., 0]
        )
        block = draft.sample_block(hidden, anchor)
        # greedy drafting equals the teacher-forced argmax chain fed with its own previous choices
        chain_prev = torch.cat((anchor[:, None], block.tokens[:, :-1]), dim=1)
        assert torch.equal(block.tokens, draft.draft_logits(hidden, chain_prev).argmax(-1))
        torch.testing.assert_close(block.confidence_logits, draft.confidence_logits(hidden, chain_prev))
        sampled = draft.sample_block(hidden, anchor, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert sampled.tokens.shape == (1, 4) and sampled.logits.shape == (1, 4, 256)


def test_teacher_forced_prev_tokens():
    input_ids = torch.arange(10, 20)[None]
    prev = teacher_forced_prev_tokens(input_ids, torch.tensor([[2, 8]]), block_size=3)
    assert prev.tolist() == [[12, 13, 14, 18, 19, 19]]  # slot k of anchor a gets x_{a+k}; the tail is clamped
    assert block_position_ids(torch.tensor([[2]]), 0, 3).tolist() == [[2, 3, 4]]


def test_head_variants(qwen3_config):
    no_markov = make_draft(qwen3_config, confidence_head_with_markov=False)
    assert no_markov.confidence_head.proj.weight.shape == (1, 64)
    no_confidence = make_draft(qwen3_config, enable_confidence_head=False)
    assert not hasattr(no_confidence, "confidence_head")
    assert no_confidence.sample_block(torch.randn(1, 2, 64), torch.tensor([1])).confidence_logits is None
    with pytest.raises(SpectoolError, match="markov_head_type"):
        make_draft(qwen3_config, markov_head_type="rnn")
