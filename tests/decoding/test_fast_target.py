"""The lean target forward against the transformers forward it replaces: same logits and features through
prefill, chain verifies, crops, tree verifies and cache growth, for every architecture it claims; a clear
fallback for the ones it does not."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    MistralConfig,
    Qwen2Config,
)

from spectool.decoding import fast_target, native
from spectool.decoding.engine import Engine, TargetSession, target_session
from spectool.decoding.fast_target import FastTargetSession, fast_path_problem
from spectool.target import FrozenTarget
from tests.conftest import TINY_VOCAB, tiny_llama_config, tiny_qwen3_config

SMALL = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3)
HEADS = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5)


def qwen2_config(**overrides):
    return Qwen2Config(**SMALL, **HEADS, architectures=["Qwen2ForCausalLM"], **overrides)  # q/k/v biases


def mistral_config(**overrides):
    return MistralConfig(**SMALL, **HEADS, sliding_window=None, architectures=["MistralForCausalLM"], **overrides)


CONFIGS = {
    "qwen3": lambda: tiny_qwen3_config(),
    "llama3-rope": lambda: tiny_llama_config(),
    "llama-biases": lambda: tiny_llama_config(attention_bias=True, mlp_bias=True, rope_scaling=None),
    "qwen2": qwen2_config,
    "mistral": mistral_config,
}


def build(config, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval().to(dtype)
    with torch.no_grad():  # random biases (they start at zero) so the packed bias is exercised
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    return model


def both(model, layer_ids):
    return TargetSession(FrozenTarget(model, layer_ids)), FastTargetSession(FrozenTarget(model, layer_ids))


def assert_same(a, b):
    (logits_a, features_a), (logits_b, features_b) = a, b
    torch.testing.assert_close(logits_b, logits_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(features_b, features_a, rtol=1e-4, atol=1e-4)


@pytest.fixture(params=["torch-glue", "native-glue"])
def glue(request, monkeypatch):
    """The layers' glue (RMSNorm, rotary + cache writes) by torch ops, or forced through the native kernels
    (which large float32 CPU models get)."""
    if request.param == "native-glue":
        if native.library() is None:
            pytest.skip(f"no native kernels: {native.unavailable_reason()}")
        monkeypatch.setattr(fast_target, "native_glue_fits", lambda *_a: True)
    return request.param == "native-glue"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_the_transformers_forward_through_a_decoding_session(name, glue):
    model = build(CONFIGS[name]())
    n = model.config.num_hidden_layers
    slow, fast = both(model, [-1, 0, n - 1])
    assert fast_path_problem(fast.target) is None and fast.native_glue == glue
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, TINY_VOCAB, (1, 11), generator=gen)
    assert_same(slow.forward(prompt), fast.forward(prompt))
    for width, keep in ((5, 2), (1, 1), (7, 7), (3, 0)):  # verify `width` tokens, keep `keep` + 1 of them
        block = torch.randint(0, TINY_VOCAB, (1, width), generator=gen)
        assert_same(slow.forward(block), fast.forward(block))
        committed = slow.length - width + keep + 1 if keep < width else slow.length
        slow.crop(committed)
        fast.crop(committed)
        assert fast.length == slow.length == committed


@pytest.mark.parametrize("name", ["qwen3", "llama3-rope"])
def test_tree_verify_and_keep_match(name, glue):
    model = build(CONFIGS[name]())
    slow, fast = both(model, [0, 1])
    assert fast.native_glue == glue
    prompt = torch.arange(3, 12).unsqueeze(0)
    assert_same(slow.forward(prompt), fast.forward(prompt))
    base = slow.length
    # root, two children of the root, a grandchild under the second child
    parents = [-1, 0, 0, 2]
    mask = torch.zeros(1, 1, 4, base + 4, dtype=torch.bool)
    mask[..., :base] = True
    depth = []
    for row in range(len(parents)):
        node, d = row, 0
        while node != -1:
            mask[0, 0, row, base + node] = True
            node, d = parents[node], d + (parents[node] != -1)
        depth.append(d)
    positions = torch.tensor([[base + d for d in depth]])
    tokens = torch.tensor([[20, 21, 22, 23]])
    assert_same(slow.forward(tokens, mask, positions), fast.forward(tokens, mask, positions))
    slow.keep(base, [0, 2, 3])
    fast.keep(base, [0, 2, 3])
    assert fast.length == slow.length == base + 3
    nxt = torch.tensor([[30, 31]])
    assert_same(slow.forward(nxt), fast.forward(nxt))


def test_cache_grows_past_its_first_capacity(glue):
    model = build(CONFIGS["qwen3"]())
    slow, fast = both(model, [1])
    assert fast.native_glue == glue
    first = fast.capacity
    long_prompt = torch.randint(0, TINY_VOCAB, (1, first - 3), generator=torch.Generator().manual_seed(0))
    assert_same(slow.forward(long_prompt), fast.forward(long_prompt))
    block = torch.arange(8).unsqueeze(0)
    assert_same(slow.forward(block), fast.forward(block))  # crosses the old capacity: cache and rotary tables grow
    assert fast.capacity > first and fast.length == first + 5


def test_packing_shares_memory_and_keeps_the_transformers_forward():
    model = build(CONFIGS["qwen2"]())
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        before = model(ids).logits
    FastTargetSession(FrozenTarget(model, [0]))
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    second = FastTargetSession(FrozenTarget(model, [0]))  # finds the weights packed already: no new copy
    assert second.layers[0].qkv.data_ptr() == attn.q_proj.weight.data_ptr()


def test_bf16_stays_close_to_the_transformers_forward():
    model = build(CONFIGS["qwen3"](), dtype=torch.bfloat16)
    slow, fast = both(model, [0])
    prompt = torch.arange(5, 30).unsqueeze(0)
    (logits_a, _), (logits_b, _) = slow.forward(prompt), fast.forward(prompt)
    assert logits_b.dtype == torch.bfloat16
    torch.testing.assert_close(logits_b.float(), logits_a.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (lambda: qwen2_config(use_sliding_window=True, sliding_window=4, max_window_layers=0), "sliding"),
        (lambda: mistral_config(hidden_act="gelu"), "silu"),
        (lambda: tiny_llama_config(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rotary"),
    ],
)
def test_unsupported_targets_fall_back_to_transformers(config, reason):
    model = build(config())
    frozen = FrozenTarget(model, [0])
    assert reason in fast_path_problem(frozen)
    assert isinstance(target_session(frozen), TargetSession)
    with pytest.raises(ValueError, match="does not support"):
        FastTargetSession(frozen)
    # The engine still decodes (target alone) through the fallback, with the model's own greedy output.
    prompt = [3, 4, 5, 6]
    ours = [t for r in Engine(FrozenTarget(model, [])).generate(prompt, max_new_tokens=6) for t in r.tokens]
    reference = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert ours == reference[0, 4:].tolist()


def test_models_spread_over_devices_fall_back():
    model = build(CONFIGS["llama3-rope"]())
    model.model.layers[1].mlp.to("meta")  # stands in for a second device
    assert "several devices" in fast_path_problem(FrozenTarget(model, [0]))


def test_engine_uses_the_lean_forward_for_supported_targets(qwen3_target):
    assert isinstance(Engine(FrozenTarget(qwen3_target, [])).session, FastTargetSession)
