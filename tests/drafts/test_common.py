"""Shared draft pieces: reading target configs (both rope forms, head_dim), rotary against transformers, KV cache."""

from types import SimpleNamespace

import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from spectool.drafts.common import (
    DraftKVCache,
    RotaryEmbedding,
    apply_rotary,
    draft_fields_from_target,
    head_dim_of,
    rope_parameters_of,
)
from spectool.drafts.eagle3 import Eagle3DraftConfig
from spectool.errors import SpectoolError
from tests.conftest import tiny_llama_config, tiny_qwen3_config


def test_head_dim_explicit_vs_derived(qwen3_config, llama_config):
    assert head_dim_of(qwen3_config) == 32  # explicit; hidden/heads would be 16
    assert head_dim_of(SimpleNamespace(hidden_size=64, num_attention_heads=4, head_dim=None)) == 16
    assert head_dim_of(llama_config) == 16


def test_rope_parameters_legacy_form():
    legacy = SimpleNamespace(
        rope_theta=500000.0,
        rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
        max_position_embeddings=4096,
    )
    params = rope_parameters_of(legacy)
    assert params["rope_type"] == "llama3" and params["rope_theta"] == 500000.0
    assert params["original_max_position_embeddings"] == 4096
    assert rope_parameters_of(SimpleNamespace(rope_theta=1e6, max_position_embeddings=8)) == {
        "rope_type": "default",
        "rope_theta": 1e6,
    }


def test_rope_parameters_v5_and_nested_forms(llama_config):
    params = rope_parameters_of(llama_config)  # built from rope_theta + rope_scaling, stored as rope_parameters
    assert params["rope_type"] == "llama3" and params["rope_theta"] == 500000.0 and params["factor"] == 8.0
    nested = SimpleNamespace(
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
        max_position_embeddings=8,
    )
    assert rope_parameters_of(nested)["rope_theta"] == 1e6


def test_unknown_rope_type_is_an_error():
    with pytest.raises(SpectoolError, match="rope type"):
        rope_parameters_of(SimpleNamespace(rope_parameters={"rope_type": "nope", "rope_theta": 1.0}))


def test_draft_fields_read_text_config_of_multimodal_targets(qwen3_config):
    wrapper = SimpleNamespace(text_config=qwen3_config, architectures=["SomeVLForConditionalGeneration"])
    fields = draft_fields_from_target(wrapper)
    assert fields["hidden_size"] == 64 and fields["head_dim"] == 32 and fields["num_target_layers"] == 4
    assert fields["num_key_value_heads"] == 2 and fields["attention_bias"] is False


@pytest.mark.parametrize(
    ("target_config", "hf_rotary"),
    [(tiny_qwen3_config(), Qwen3RotaryEmbedding), (tiny_llama_config(), LlamaRotaryEmbedding)],
    ids=["qwen3-default", "llama3-scaled"],
)
def test_rotary_matches_transformers(target_config, hf_rotary):
    draft_config = Eagle3DraftConfig.from_target(target_config, target_layer_ids=[0, 1, 2])
    positions = torch.tensor([[0, 1, 2, 7, 300, 511]])
    cos, sin = RotaryEmbedding(draft_config)(positions, torch.float32)
    ref_cos, ref_sin = hf_rotary(target_config)(torch.zeros(1), positions)
    torch.testing.assert_close(cos, ref_cos)
    torch.testing.assert_close(sin, ref_sin)


def test_yarn_rotary_uses_transformers_yarn_frequencies(gpt_oss_config):
    draft_config = Eagle3DraftConfig.from_target(gpt_oss_config, target_layer_ids=[0, 1, 2])
    assert draft_config.rope_parameters["rope_type"] == "yarn"
    inv_freq, scaling = ROPE_INIT_FUNCTIONS["yarn"](gpt_oss_config, "cpu")
    assert scaling != 1.0  # YaRN scales attention through cos/sin
    positions = torch.tensor([[0, 5, 900]])
    cos, _ = RotaryEmbedding(draft_config)(positions, torch.float32)
    expected = torch.cos(positions[..., None].float() * inv_freq) * scaling
    torch.testing.assert_close(cos[..., : inv_freq.numel()], expected)


def test_partial_rotary_leaves_the_tail_unrotated():
    x = torch.randn(1, 2, 3, 8)
    cos, sin = torch.zeros(1, 3, 4), torch.ones(1, 3, 4)
    out = apply_rotary(x, cos, sin)
    torch.testing.assert_close(out[..., 4:], x[..., 4:])
    torch.testing.assert_close(out[..., :2], -x[..., 2:4])


def test_kv_cache_appends_and_crops():
    cache = DraftKVCache(num_layers=2)
    for layer in range(2):
        cache.update(layer, torch.ones(1, 2, 5, 4), torch.ones(1, 2, 5, 4))
    k, _ = cache.update(0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    assert k.shape[2] == 8 and cache.get_seq_length() == 8
    cache.crop(6)
    assert cache.get_seq_length() == 6 and cache.layer(1)[0].shape[2] == 5
    assert torch.equal(cache.layer(0)[0][:, :, 5], torch.zeros(1, 2, 4))
    with pytest.raises(ValueError):
        cache.crop(7)
