"""DFlash draft: the z-lab layout of SPEC §5, the block mask, caching, and compatibility with the PyPI package."""

import json

import pytest
import torch
from safetensors.torch import load_file

from spectool.drafts import (
    Qwen3DFlashDraftModel,
    block_input_ids,
    block_position_ids,
    build_block_attention_mask,
    build_draft,
)
from spectool.errors import SpectoolError


def dflash_keys(num_layers: int) -> set[str]:
    """SPEC §5, written out by hand."""
    keys = {"fc.weight", "hidden_norm.weight", "norm.weight"}
    for i in range(num_layers):
        keys |= {
            f"layers.{i}.self_attn.q_proj.weight",
            f"layers.{i}.self_attn.k_proj.weight",
            f"layers.{i}.self_attn.v_proj.weight",
            f"layers.{i}.self_attn.o_proj.weight",
            f"layers.{i}.self_attn.q_norm.weight",
            f"layers.{i}.self_attn.k_norm.weight",
            f"layers.{i}.mlp.gate_proj.weight",
            f"layers.{i}.mlp.up_proj.weight",
            f"layers.{i}.mlp.down_proj.weight",
            f"layers.{i}.input_layernorm.weight",
            f"layers.{i}.post_attention_layernorm.weight",
        }
    return keys


def make_draft(target_config, **kwargs):
    torch.manual_seed(0)
    options = dict(target_layer_ids=[0, 2], block_size=4, mask_token_id=255)
    options.update(kwargs)
    return build_draft("dflash", target_config, **options).eval()


@pytest.fixture
def draft(qwen3_config):
    return make_draft(qwen3_config)


def test_saved_keys_shapes_and_config_follow_spec(tmp_path, draft):
    draft.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert set(tensors) == dflash_keys(2)
    assert tensors["fc.weight"].shape == (64, 2 * 64)
    assert tensors["layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)  # head_dim 32, explicit
    assert tensors["layers.0.self_attn.k_proj.weight"].shape == (2 * 32, 64)
    assert tensors["layers.0.self_attn.q_norm.weight"].shape == (32,)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["model_type"] == "qwen3"
    assert config["dflash_config"] == {"block_size": 4, "mask_token_id": 255, "target_layer_ids": [0, 2]}
    assert config["block_size"] == 4 and config["num_target_layers"] == 4 and config["num_hidden_layers"] == 2
    assert config["layer_types"] == ["full_attention", "full_attention"]
    assert config["head_dim"] == 32 and config["hidden_size"] == 64


def test_round_trip_is_bitwise(tmp_path, draft):
    draft.save_pretrained(tmp_path)
    loaded = Qwen3DFlashDraftModel.from_pretrained(tmp_path)
    assert loaded.state_dict().keys() == draft.state_dict().keys()
    for key, value in draft.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert (loaded.block_size, loaded.mask_token_id, loaded.target_layer_ids) == (4, 255, [0, 2])


def reference_block_mask(anchors, valid, context_mask, context_length, block_size):
    """Element by element: block j sees context keys < its anchor (if valid) and its own block only."""
    batch, num_anchors = len(anchors), len(anchors[0])
    queries = num_anchors * block_size
    mask = torch.zeros(batch, 1, queries, context_length + queries, dtype=torch.bool)
    for b in range(batch):
        for q in range(queries):
            j = q // block_size
            for s in range(context_length):
                mask[b, 0, q, s] = bool(valid[b][j]) and s < anchors[b][j] and bool(context_mask[b][s])
            for key in range(queries):
                mask[b, 0, q, context_length + key] = key // block_size == j
    return mask


def test_block_mask_equals_elementwise_reference():
    anchors = [[1, 5, 0], [3, 2, 7]]
    valid = [[True, True, False], [True, True, True]]
    context_mask = [[1] * 10, [1] * 8 + [0] * 2]
    mask = build_block_attention_mask(
        torch.tensor(anchors), 10, 3, anchor_valid=torch.tensor(valid), context_mask=torch.tensor(context_mask)
    )
    assert torch.equal(mask, reference_block_mask(anchors, valid, context_mask, 10, 3))
    assert mask.any(dim=-1).all()  # no fully masked row, padding block included


def test_block_layout_helpers():
    assert block_input_ids(torch.tensor([[7, 9]]), 3, 255).tolist() == [[7, 255, 255, 9, 255, 255]]
    assert block_position_ids(torch.tensor([[1, 4]]), 3, 2).tolist() == [[0, 1, 2, 1, 2, 4, 5]]


def test_packed_training_blocks_equal_separate_decoding_blocks(draft):
    """With the block mask, each packed block sees exactly what a decode-time block with context x_{<a} sees."""
    generator = torch.Generator().manual_seed(5)
    seq, block = 9, 4
    context = torch.randn(1, seq, 128, generator=generator)
    anchors = torch.tensor([[2, 5]])
    embeds = torch.randn(1, 2 * block, 64, generator=generator)
    with torch.no_grad():
        packed = draft(
            embeds,
            context,
            block_position_ids(anchors, seq, block),
            attention_mask=build_block_attention_mask(anchors, seq, block),
        )
        for j, anchor in enumerate(anchors[0].tolist()):
            alone = draft(
                embeds[:, j * block : (j + 1) * block],
                context[:, :anchor],
                torch.arange(anchor + block)[None],
            )
            torch.testing.assert_close(packed[:, j * block : (j + 1) * block], alone, atol=1e-5, rtol=1e-5)


def test_cached_context_equals_full_context(draft):
    generator = torch.Generator().manual_seed(6)
    context = torch.randn(2, 7, 128, generator=generator)
    block = torch.randn(2, 4, 64, generator=generator)
    with torch.no_grad():
        full = draft(block, context, torch.arange(11))
        cache = draft.new_cache()
        draft(block, context[:, :5], torch.arange(9), past_key_values=cache)
        assert cache.get_seq_length() == 5  # only context is cached, never the block
        cached = draft(block, context[:, 5:], torch.arange(5, 11), past_key_values=cache)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_draft_heads_may_differ_width_may_not(qwen3_config):
    model = make_draft(qwen3_config, num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=32)
    assert model.layers[0].self_attn.q_proj.weight.shape == (2 * 16, 64)
    assert model.layers[0].mlp.up_proj.weight.shape == (32, 64)
    with pytest.raises(SpectoolError, match="as wide as its target"):
        make_draft(qwen3_config, hidden_size=32)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")  # the package's own call
def test_loads_and_runs_in_the_dflash_package(tmp_path, draft, qwen3_target):
    """A spectool checkpoint loads in z-lab's ``dflash`` unchanged and computes the same draft hidden states."""
    dflash_model = pytest.importorskip("dflash.model")
    draft.save_pretrained(tmp_path)
    theirs, info = dflash_model.DFlashDraftModel.from_pretrained(tmp_path, output_loading_info=True)
    theirs.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (theirs.block_size, theirs.mask_token_id, list(theirs.target_layer_ids)) == (4, 255, [0, 2])

    generator = torch.Generator().manual_seed(9)
    context = torch.randn(2, 6, 128, generator=generator)
    block = torch.randn(2, 4, 64, generator=generator)
    positions = torch.arange(10).expand(2, 10)
    with torch.no_grad():
        ours = draft(block, context, positions)
        reference = theirs(position_ids=positions, noise_embedding=block, target_hidden=context)
        torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)

        # two decoding rounds with caches: theirs caches [context | block] and crops; ours caches context only
        our_cache, their_cache = draft.new_cache(), dflash_model._make_cache(theirs.config)
        for start, new_context in ((0, context), (6, torch.randn(2, 3, 128, generator=generator))):
            positions = torch.arange(start, start + new_context.shape[1] + 4).expand(2, -1)
            ours = draft(block, new_context, positions, past_key_values=our_cache)
            reference = theirs(
                position_ids=positions,
                noise_embedding=block,
                target_hidden=new_context,
                past_key_values=their_cache,
                use_cache=True,
            )
            dflash_model._crop_to(their_cache, start + new_context.shape[1])
            torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)

        # and its own decoding loop runs the checkpoint losslessly against the target's greedy output
        prompt = torch.randint(0, 250, (1, 6), generator=generator)
        generated = dflash_model.dflash_generate(theirs, qwen3_target, prompt, max_new_tokens=8, stop_token_ids=None)
        greedy = qwen3_target.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, greedy)
