"""Registries (SPEC §1): dispatch on architectures, errors naming the method and the supported strings."""

import pytest

from spectool import catalog, registry
from spectool.errors import UsageError
from spectool.registry import UnsupportedArchitecture, match_architecture, resolve


def config(archs, layers=36, vocab=151936, hidden=4096):
    return {
        "architectures": archs,
        "model_type": "x",
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": 3 * hidden,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": vocab,
    }


DENSE = ["LlamaForCausalLM", "Phi3ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"]


@pytest.mark.parametrize("arch", DENSE)
def test_eagle_registries_cover_the_four_dense_strings(arch):
    assert resolve("eagle1", config([arch])).draft_class == "LlamaEagleDraftModel"
    assert resolve("eagle3", config([arch])).draft_class == "LlamaEagle3DraftModel"


def test_gpt_oss_gets_the_yarn_eagle3_draft_only():
    cfg = catalog.lookup("openai/gpt-oss-20b").config
    assert resolve("eagle3", cfg).draft_class == "GptOssEagle3DraftModel"
    for method in ("eagle1", "dflash", "dspark"):
        with pytest.raises(UnsupportedArchitecture):
            resolve(method, cfg)


@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "Qwen3MoeForCausalLM"])
def test_dflash_and_dspark_take_qwen3(arch):
    assert resolve("dflash", config([arch]), tokenizer_length=151669).draft_class == "Qwen3DFlashDraftModel"
    assert resolve("dspark", config([arch]), tokenizer_length=151669).draft_class == "Qwen3DSparkModel"


def test_unsupported_names_method_and_lists_supported():
    with pytest.raises(UnsupportedArchitecture) as info:
        resolve("dflash", config(["Phi3ForCausalLM"]))
    message = str(info.value)
    assert message.startswith("DFlash has no draft for architectures [Phi3ForCausalLM]")
    assert "supported: Qwen3ForCausalLM, Qwen3MoeForCausalLM, LlamaForCausalLM" in message
    assert info.value.exit_code == 1
    with pytest.raises(UnsupportedArchitecture, match="none listed"):
        resolve("eagle3", config([]))


def test_first_registered_string_in_config_wins():
    arch, _ = match_architecture("eagle3", ["MyWrapper", "Qwen3MoeForCausalLM", "LlamaForCausalLM"])
    assert arch == "Qwen3MoeForCausalLM"


def test_multimodal_text_stack():
    cfg = {"architectures": ["Qwen3VLForConditionalGeneration"], "text_config": config(["Qwen3ForCausalLM"], 28)}
    spec = resolve("dspark", cfg, tokenizer_length=151669)
    assert spec.architecture == "Qwen3ForCausalLM"
    assert spec.target_layer_ids == (1, 8, 14, 20, 27)


def test_adding_a_family_is_one_line(monkeypatch):
    monkeypatch.setitem(registry.get("dflash").architectures, "Qwen3NextForCausalLM", "Qwen3DFlashDraftModel")
    assert resolve("dflash", config(["Qwen3NextForCausalLM"]), mask_token_id=5).draft_class == "Qwen3DFlashDraftModel"


def test_defaults_on_qwen3_8b():
    cfg = catalog.lookup("Qwen/Qwen3-8B").config
    dflash = resolve("dflash", cfg, tokenizer_length=151669)
    assert (dflash.num_draft_layers, dflash.option("block_size"), dflash.option("mask_token_id")) == (5, 16, 151669)
    assert dflash.target_layer_ids == (1, 9, 17, 25, 33)
    dspark = resolve("dspark", cfg, tokenizer_length=151669)
    assert (dspark.num_draft_layers, dspark.option("block_size"), dspark.option("markov_rank")) == (5, 7, 256)
    assert dspark.target_layer_ids == (1, 10, 18, 26, 35)
    eagle3 = resolve("eagle3", cfg)
    assert eagle3.target_layer_ids == (1, 17, 32) and eagle3.option("draft_vocab_size") == 32000
    assert resolve("eagle1", cfg).target_layer_ids == (35,)


def test_defaults_scale_down_on_a_shallow_target():
    cfg = config(["Qwen3ForCausalLM"], layers=8, vocab=4096, hidden=256)
    dflash = resolve("dflash", cfg, tokenizer_length=4080)
    assert (dflash.num_draft_layers, dflash.option("block_size"), dflash.option("mask_token_id")) == (2, 8, 4080)
    assert dflash.target_layer_ids == (1, 5)  # K defaults to the draft depth: round(1 + i*4/1)
    dspark = resolve("dspark", cfg, tokenizer_length=4080)
    assert dspark.option("markov_rank") == 64 and dspark.target_layer_ids == (1, 2, 4, 6, 7)
    assert resolve("eagle3", cfg).option("draft_vocab_size") is None  # vocab 4096 <= 32000: no pruning


def test_mask_token_unknown_without_spare_rows():
    cfg = config(["Qwen3ForCausalLM"], vocab=1000)
    assert resolve("dflash", cfg, tokenizer_length=1000).option("mask_token_id") is None
    assert resolve("dflash", cfg).option("mask_token_id") is None
    assert resolve("dflash", cfg, mask_token_id=7).option("mask_token_id") == 7


def test_user_layer_ids_are_validated():
    cfg = config(["Qwen3ForCausalLM"])
    assert resolve("dflash", cfg, target_layer_ids=[2, 4, 6]).target_layer_ids == (2, 4, 6)
    with pytest.raises(UsageError, match="exactly 3"):
        resolve("eagle3", cfg, target_layer_ids=[2, 4])
    with pytest.raises(UsageError, match="strictly increasing"):
        resolve("dspark", cfg, target_layer_ids=[4, 2])
    with pytest.raises(UsageError, match="exactly 5"):
        resolve("dspark", cfg, target_layer_ids=[1, 2], num_feature_layers=5)


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("dflash", {"block_size": 1}, "--block-size must be between 2 and 64"),
        ("dflash", {"mask_token_id": 151936}, "outside the target's embedding"),
        ("eagle3", {"draft_vocab_size": 0}, "--draft-vocab-size"),
        ("dspark", {"num_draft_layers": 0}, "--num-draft-layers"),
        ("dspark", {"num_feature_layers": 40}, "between 1 and 35"),
        ("medusa", {}, "unknown method"),
    ],
)
def test_bad_options_are_usage_errors(method, options, message):
    with pytest.raises(UsageError, match=message) as info:
        resolve(method, config(["Qwen3ForCausalLM"]), **options)
    assert info.value.exit_code == 2


def test_the_four_methods_are_registered_with_their_facts():
    assert registry.method_names() == ["eagle1", "eagle3", "dflash", "dspark"]
    for method in registry.methods():
        assert method.title and method.checkpoint_format and method.required_keys and method.architectures
        assert method.checkpoint_architectures and method.default_lr > 0


def test_an_option_the_method_does_not_take_is_refused():
    with pytest.raises(UsageError, match="--block-size does not apply to EAGLE-3 drafts"):
        resolve("eagle3", config(["Qwen3ForCausalLM"]), block_size=8)


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get("dflash"))


def test_block_methods_share_an_abstract_base_that_is_not_a_method():
    """DFlash and DSpark share `BlockMethod` (not registered: it is abstract); only DFlash reads z-lab configs."""
    from spectool.methods.blocks import BlockMethod

    dflash, dspark = registry.get("dflash"), registry.get("dspark")
    assert isinstance(dflash, BlockMethod) and isinstance(dspark, BlockMethod)
    assert not isinstance(dspark, type(dflash))
    assert all(type(method) is not BlockMethod for method in registry.methods())
    zlab = {"dflash_config": {"target_layer_ids": [1, 9]}, "target_layer_ids": [2, 3]}
    assert dflash.claims(zlab) and dflash.config_layer_ids(zlab) == [1, 9]
    assert not dspark.claims(zlab) and dspark.config_layer_ids(zlab) == [2, 3]
    assert dflash.default_block_size(8) == 8 and dflash.default_block_size(36) == 16
    assert dspark.default_block_size(8) == dspark.default_block_size(36) == 7
