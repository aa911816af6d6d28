"""EAGLE-3 draft: the SGLang/vLLM layout of SPEC §5, round trips, and the TTT attention against a naive loop."""

import json

import pytest
import torch
from safetensors.torch import load_file

from spectool.drafts import GptOssEagle3DraftModel, LlamaEagle3DraftModel, build_draft
from spectool.drafts.common import apply_rotary
from spectool.errors import SpectoolError

# SPEC §5, written out by hand.
EAGLE3_KEYS = {
    "fc.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
    "midlayer.input_layernorm.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.post_attention_layernorm.weight",
    "norm.weight",
    "lm_head.weight",
}
PRUNED_VOCAB_KEYS = {"d2t", "t2d"}


def make_draft(target_config, **kwargs):
    torch.manual_seed(0)
    return build_draft("eagle3", target_config, target_layer_ids=[0, 1, 2], **kwargs).eval()


@pytest.fixture
def draft(qwen3_config, qwen3_target):
    model = make_draft(qwen3_config)
    model.attach_target_embeddings(qwen3_target.get_input_embeddings())
    return model


def test_saved_keys_and_config_follow_spec(tmp_path, qwen3_config):
    model = make_draft(qwen3_config)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert set(tensors) == EAGLE3_KEYS  # no embed_tokens, no d2t/t2d without pruning
    h, v = 64, 256
    assert tensors["fc.weight"].shape == (h, 3 * h)
    for name in ("q", "k", "v"):
        assert tensors[f"midlayer.self_attn.{name}_proj.weight"].shape[1] == 2 * h
    assert tensors["midlayer.self_attn.q_proj.weight"].shape == (4 * 32, 2 * h)  # head_dim 32 from the target
    assert tensors["lm_head.weight"].shape == (v, h)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 1
    assert config["draft_vocab_size"] == v and config["tie_word_embeddings"] is False
    assert config["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [0, 1, 2], "use_aux_hidden_state": True}
    assert config["rope_theta"] == 10000.0 and config["rms_norm_eps"] == 1e-6 and config["head_dim"] == 32
    assert "target_hidden_size" not in config and "target_layer_ids" not in config


def test_pruned_vocab_keys_mapping_and_round_trip(tmp_path, llama_config):
    model = make_draft(llama_config, draft_vocab_size=100)
    assert model.d2t.dtype == torch.int64 and model.d2t.shape == (100,)
    assert model.t2d.dtype == torch.bool and model.t2d.shape == (256,)
    kept = torch.randperm(256, generator=torch.Generator().manual_seed(3))[:100]
    model.set_vocab_mapping(kept)
    draft_ids = torch.arange(100)
    assert torch.equal(model.draft_to_target(draft_ids), kept.sort().values)
    assert int(model.t2d.sum()) == 100 and bool(model.t2d[kept].all())
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert set(tensors) == EAGLE3_KEYS | PRUNED_VOCAB_KEYS
    assert tensors["lm_head.weight"].shape == (100, 64)
    loaded = LlamaEagle3DraftModel.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert json.loads((tmp_path / "config.json").read_text())["draft_vocab_size"] == 100


def test_round_trip_is_bitwise_and_forward_identical(tmp_path, draft, qwen3_target):
    draft.save_pretrained(tmp_path)
    loaded = LlamaEagle3DraftModel.from_pretrained(tmp_path).eval()
    assert loaded.state_dict().keys() == draft.state_dict().keys()
    for key, value in draft.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert loaded.get_input_embeddings() is None  # the target's embedding is never part of the checkpoint
    loaded.attach_target_embeddings(qwen3_target.get_input_embeddings())
    ids, features = torch.randint(0, 256, (1, 5)), torch.randn(1, 5, 192)
    with torch.no_grad():
        a = draft(ids, target_hidden_states=features).logits
        b = loaded(ids, target_hidden_states=features).logits
    assert torch.equal(a, b)


def naive_ttt(draft, input_ids, target_hidden_states, steps):
    """Each TTT step recomputed with explicit per-query key lists: causal step-0 keys + same-position keys of
    steps 1..i, rotary positions shifted by the step index."""
    attn = draft.midlayer.self_attn
    batch, seq = input_ids.shape
    groups = attn.num_heads // attn.num_kv_heads
    hidden = draft.fc(target_hidden_states)
    keys, values, outputs = [], [], []
    for step in range(steps):
        ids = torch.tensor([[row[t + step] if t + step < seq else 0 for t in range(seq)] for row in input_ids.tolist()])
        x = draft.midlayer.attention_input(draft.embed(ids), hidden)
        cos, sin = draft.rotary_emb(torch.arange(seq)[None] + step, x.dtype)
        q = apply_rotary(attn.query(x), cos, sin)
        k, v = attn.key_value(x)
        keys.append(apply_rotary(k, cos, sin))
        values.append(v)
        out = torch.zeros(batch, attn.num_heads, seq, attn.head_dim)
        for b in range(batch):
            for head in range(attn.num_heads):
                kv_head = head // groups
                for t in range(seq):
                    visible = [(0, s) for s in range(t + 1)] + [(j, t) for j in range(1, step + 1)]
                    key_rows = torch.stack([keys[j][b, kv_head, s] for j, s in visible])
                    value_rows = torch.stack([values[j][b, kv_head, s] for j, s in visible])
                    weights = torch.softmax(key_rows @ q[b, head, t] * attn.scaling, dim=0)
                    out[b, head, t] = weights @ value_rows
        hidden = draft.midlayer.finish(hidden, attn.output(out))
        outputs.append(hidden)
    return outputs


def test_ttt_forward_matches_naive_reference(draft):
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, 256, (2, 7), generator=generator)
    features = torch.randn(2, 7, 192, generator=generator)
    with torch.no_grad():
        fast = draft.ttt_forward(input_ids, features, ttt_steps=3)
        slow = naive_ttt(draft, input_ids, features, steps=3)
    assert len(fast.hidden_states) == len(fast.logits) == 3
    for step in range(3):
        torch.testing.assert_close(fast.hidden_states[step], slow[step], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.logits[step], draft.compute_logits(slow[step]), atol=1e-5, rtol=1e-5)


def test_ttt_step0_and_cached_decoding_equal_a_plain_forward(draft):
    generator = torch.Generator().manual_seed(8)
    input_ids = torch.randint(0, 256, (1, 6), generator=generator)
    features = torch.randn(1, 6, 192, generator=generator)
    with torch.no_grad():
        full = draft(input_ids, target_hidden_states=features)
        ttt = draft.ttt_forward(input_ids, features, ttt_steps=1)
        torch.testing.assert_close(ttt.hidden_states[0], full.hidden_states)
        cache = draft.new_cache()
        first = draft(input_ids[:, :4], target_hidden_states=features[:, :4], past_key_values=cache)
        second = draft(input_ids[:, 4:], target_hidden_states=features[:, 4:], past_key_values=cache)
        assert cache.get_seq_length() == 6
        torch.testing.assert_close(torch.cat((first.logits, second.logits), 1), full.logits, atol=1e-5, rtol=1e-5)
        # a draft step feeds the draft's own output back; cropping drops it again
        draft(input_ids[:, -1:], hidden_states=second.hidden_states[:, -1:], past_key_values=cache)
        cache.crop(6)
        assert cache.get_seq_length() == 6


def test_ttt_padding_rows_stay_finite(draft):
    input_ids = torch.randint(0, 256, (2, 5))
    padding = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # left padding: row 0 of sample 1 has no real key
    out = draft.ttt_forward(input_ids, torch.randn(2, 5, 192), ttt_steps=2, attention_mask=padding)
    assert all(torch.isfinite(logits).all() for logits in out.logits)


def test_embeddings_must_be_attached(qwen3_config):
    model = make_draft(qwen3_config)
    with pytest.raises(SpectoolError, match="attach_target_embeddings"):
        model(torch.zeros(1, 2, dtype=torch.long), target_hidden_states=torch.zeros(1, 2, 192))


def test_draft_width_may_differ_from_target(tmp_path, qwen3_config):
    model = make_draft(qwen3_config, hidden_size=48, num_attention_heads=2, num_key_value_heads=1, head_dim=24)
    assert model.fc.weight.shape == (48, 3 * 64)  # fc input stays 3 * H_target
    assert model.midlayer.self_attn.q_proj.weight.shape == (2 * 24, 2 * 48)
    assert model.owns_embeddings and model.embed_tokens.weight.shape == (256, 48)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["target_hidden_size"] == 64 and config["hidden_size"] == 48
    assert set(load_file(tmp_path / "model.safetensors")) == EAGLE3_KEYS | {"embed_tokens.weight"}
    out = model(torch.randint(0, 256, (1, 3)), target_hidden_states=torch.randn(1, 3, 192))
    assert out.logits.shape == (1, 3, 256) and out.hidden_states.shape == (1, 3, 48)


def test_gpt_oss_target_gets_the_yarn_variant(tmp_path, gpt_oss_config):
    model = make_draft(gpt_oss_config)
    assert isinstance(model, GptOssEagle3DraftModel)
    assert model.config.rope_parameters["rope_type"] == "yarn"
    assert model.midlayer.self_attn.q_proj.bias is not None  # gpt-oss has attention_bias
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]  # same on-disk format
    assert config["rope_scaling"]["rope_type"] == "yarn" and config["rope_theta"] == 150000.0
    loaded = GptOssEagle3DraftModel.from_pretrained(tmp_path)
    assert loaded.config.rope_parameters == model.config.rope_parameters
