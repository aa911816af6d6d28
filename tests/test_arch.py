"""TargetArch: reading config.json in its various spellings, and the parameter estimate against model cards."""

import pytest

from spectool import catalog
from spectool.arch import ConfigError, TargetArch


def qwen3_tiny(**extra):
    cfg = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "num_hidden_layers": 4,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "vocab_size": 300,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    }
    cfg.update(extra)
    return cfg


def test_explicit_head_dim_is_not_derived():
    arch = TargetArch.from_config(qwen3_tiny())
    assert arch.head_dim == 32 and arch.head_dim_explicit  # 64 / 4 would be 16


def test_derived_head_dim():
    cfg = qwen3_tiny()
    del cfg["head_dim"]
    arch = TargetArch.from_config(cfg)
    assert arch.head_dim == 16 and not arch.head_dim_explicit


def test_transformers5_rope_parameters_and_dtype():
    cfg = qwen3_tiny(dtype="bfloat16", rope_parameters={"rope_type": "yarn", "rope_theta": 150000, "factor": 32.0})
    del cfg["rope_theta"]
    arch = TargetArch.from_config(cfg)
    assert arch.rope_theta == 150000 and arch.rope_type == "yarn" and arch.rope_scaling["factor"] == 32.0
    assert arch.dtype == "bfloat16"
    plain = TargetArch.from_config(qwen3_tiny(rope_parameters={"rope_type": "default", "rope_theta": 5.0}))
    assert plain.rope_type == "default" and plain.rope_theta == 5.0 and plain.rope_scaling is None


def test_multimodal_text_config():
    cfg = {"architectures": ["Qwen3VLForConditionalGeneration"], "text_config": qwen3_tiny(num_hidden_layers=6)}
    arch = TargetArch.from_config(cfg)
    assert arch.num_hidden_layers == 6
    assert arch.architectures == ("Qwen3VLForConditionalGeneration", "Qwen3ForCausalLM")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_hidden_layers": None}, "'num_hidden_layers' is missing"),
        ({"hidden_size": "64"}, "'hidden_size' should be int"),
        ({"vocab_size": 0}, "'vocab_size' must be positive"),
        ({"architectures": "Qwen3ForCausalLM"}, "'architectures' should be a list"),
        ({"num_attention_heads": True}, "'num_attention_heads' should be int"),
        ({"layer_types": ["full_attention"] * 2}, "'layer_types' names 2 layers but num_hidden_layers is 4"),
        ({"layer_types": "full_attention"}, "'layer_types' should be a list of strings"),
        ({"max_position_embeddings": 0}, "'max_position_embeddings' must be a positive integer"),
    ],
)
def test_malformed_fields_name_the_file_and_field(change, message):
    cfg = qwen3_tiny()
    for key, value in change.items():
        if value is None:
            del cfg[key]
        else:
            cfg[key] = value
    with pytest.raises(ConfigError, match=message) as info:
        TargetArch.from_config(cfg, where="/models/x/config.json")
    assert str(info.value).startswith("/models/x/config.json: ")
    assert info.value.exit_code == 1


def test_tiny_parameter_count_by_hand():
    # embed 300*64 (tied) + final norm 64; per layer: q 64*128, k 64*64, v 64*64, o 128*64, q/k norm 2*32,
    # two norms 2*64, mlp 3*64*128.
    per_layer = 64 * 128 + 64 * 64 + 64 * 64 + 128 * 64 + 2 * 32 + 2 * 64 + 3 * 64 * 128
    expected = 300 * 64 + 64 + 4 * per_layer
    assert TargetArch.from_config(qwen3_tiny()).parameter_counts() == (expected, expected)


# Model-card parameter counts (MODELS.md): (id, total, tolerance).
CARDS = [
    ("Qwen/Qwen3-0.6B", 0.596e9, 0.01e9),
    ("Qwen/Qwen3-8B", 8.19e9, 0.01e9),
    ("Qwen/Qwen3-32B", 32.76e9, 0.01e9),
    ("Qwen/Qwen3-30B-A3B", 30.53e9, 0.01e9),
    ("meta-llama/Llama-3.1-8B-Instruct", 8.03e9, 0.01e9),
    ("meta-llama/Llama-3.2-1B-Instruct", 1.236e9, 0.001e9),
    ("microsoft/Phi-3-mini-4k-instruct", 3.821e9, 0.001e9),
    ("openai/gpt-oss-20b", 20.91e9, 0.01e9),
    ("openai/gpt-oss-120b", 116.83e9, 0.01e9),
]


@pytest.mark.parametrize(("hub_id", "total", "tol"), CARDS)
def test_parameter_estimate_matches_model_cards(hub_id, total, tol):
    arch = TargetArch.from_config(catalog.lookup(hub_id).config)
    assert abs(arch.parameter_counts()[0] - total) <= tol


def test_phi4_mini_exact_count():
    arch = TargetArch.from_config(catalog.lookup("microsoft/Phi-4-mini-instruct").config)
    assert arch.parameter_counts()[0] == 3_836_021_760


def test_moe_active_counts():
    qwen = TargetArch.from_config(catalog.lookup("Qwen/Qwen3-30B-A3B").config)
    assert abs(qwen.parameter_counts()[1] - 3.35e9) < 0.01e9  # card: 3.3B active
    oss = TargetArch.from_config(catalog.lookup("openai/gpt-oss-20b").config)
    # OpenAI's 3.61B active leaves out the input embedding table (a lookup, not a matmul).
    assert abs(oss.parameter_counts()[1] - oss.vocab_size * oss.hidden_size - 3.61e9) < 0.01e9
