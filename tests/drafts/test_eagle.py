"""EAGLE-1/2 draft: SafeAILab key names, the frozen embedding copy, round trip, cached decoding."""

import json

import pytest
import torch
from safetensors.torch import load_file

from spectool.drafts import LlamaEagleDraftModel, build_draft
from spectool.errors import SpectoolError


def eagle_keys(num_layers: int) -> set[str]:
    """SafeAILab's EAGLE layout (layer 0 has no input norm) plus the final norm of SPEC §4, by hand."""
    keys = {"embed_tokens.weight", "fc.weight", "fc.bias", "norm.weight"}
    for i in range(num_layers):
        keys |= {
            f"layers.{i}.self_attn.q_proj.weight",
            f"layers.{i}.self_attn.k_proj.weight",
            f"layers.{i}.self_attn.v_proj.weight",
            f"layers.{i}.self_attn.o_proj.weight",
            f"layers.{i}.mlp.gate_proj.weight",
            f"layers.{i}.mlp.up_proj.weight",
            f"layers.{i}.mlp.down_proj.weight",
            f"layers.{i}.post_attention_layernorm.weight",
        }
        if i > 0:
            keys.add(f"layers.{i}.input_layernorm.weight")
    return keys


def make_draft(target_config, **kwargs):
    torch.manual_seed(0)
    return build_draft("eagle1", target_config, target_layer_ids=None, **kwargs).eval()


def test_keys_shapes_config_and_round_trip(tmp_path, llama_config, llama_target):
    draft = make_draft(llama_config, num_draft_layers=2)
    draft.copy_target_embeddings(llama_target)
    assert torch.equal(draft.embed_tokens.weight, llama_target.get_input_embeddings().weight)
    assert draft.frozen_parameter_names() == ["embed_tokens.weight"] and not draft.embed_tokens.weight.requires_grad
    draft.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert set(tensors) == eagle_keys(2)
    assert tensors["fc.weight"].shape == (64, 128) and tensors["layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle"] and config["num_hidden_layers"] == 2
    assert config["rope_scaling"]["rope_type"] == "llama3"
    loaded = LlamaEagleDraftModel.from_pretrained(tmp_path)
    for key, value in draft.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert not loaded.embed_tokens.weight.requires_grad


def test_predicts_features_and_decodes_with_a_cache(qwen3_config, qwen3_target):
    draft = make_draft(qwen3_config)
    draft.copy_target_embeddings(qwen3_target)
    ids, features = torch.randint(0, 256, (2, 6)), torch.randn(2, 6, 64)
    with torch.no_grad():
        full = draft(ids, hidden_states=features)
        assert full.shape == (2, 6, 64)
        logits = draft.compute_logits(full, qwen3_target.lm_head)
        assert logits.shape == (2, 6, 256)
        cache = draft.new_cache()
        first = draft(ids[:, :4], hidden_states=features[:, :4], past_key_values=cache)
        second = draft(ids[:, 4:], hidden_states=features[:, 4:], past_key_values=cache)
    torch.testing.assert_close(torch.cat((first, second), 1), full, atol=1e-5, rtol=1e-5)


def test_safeailab_variant_without_final_norm(qwen3_config):
    draft = make_draft(qwen3_config, final_norm=False)
    assert "norm.weight" not in draft.state_dict()


def test_heads_may_differ_width_may_not(qwen3_config):
    draft = make_draft(qwen3_config, num_attention_heads=2, num_key_value_heads=2, head_dim=16)
    assert draft.layers[0].self_attn.q_proj.weight.shape == (32, 64)
    with pytest.raises(SpectoolError, match="as wide as its target"):
        make_draft(qwen3_config, hidden_size=32)
