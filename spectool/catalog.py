"""A built-in offline catalog of well-known targets' architecture fields.

Used only when a Hub id cannot be fetched and is not in the local cache: `inspect` and `layers` still answer
for the popular targets on an air-gapped machine, and say visibly that the catalog was used. The values are
the config.json fields of each model (their public model cards and configs), written out here; the
tokenizer length is `len(tokenizer)`, which the Hub config does not carry.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CatalogEntry:
    """A well-known target known offline: its Hub id, its config.json and its tokenizer's length."""

    hub_id: str
    config: dict[str, Any]
    tokenizer_length: int | None
    card_parameters: str  # the model card's own figure, shown beside spectool's estimate


def _qwen3(layers: int, hidden: int, inter: int, heads: int, tie: bool) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000,
        "rope_scaling": None,
        "tie_word_embeddings": tie,
        "rms_norm_eps": 1e-06,
        "attention_bias": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    }


def _qwen3_moe(layers: int, hidden: int, moe_inter: int, heads: int) -> dict[str, Any]:
    cfg = _qwen3(layers, hidden, hidden * 3, heads, tie=False)
    cfg.update(
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        num_key_value_heads=4,
        rope_theta=1000000.0,
        moe_intermediate_size=moe_inter,
        num_experts=128,
        num_experts_per_tok=8,
    )
    return cfg


def _llama3(layers: int, hidden: int, inter: int, heads: int, factor: float, tie: bool, head_dim: bool):
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": tie,
        "rms_norm_eps": 1e-05,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
    }
    if head_dim:
        cfg["head_dim"] = hidden // heads
    return cfg


def _gpt_oss(layers: int, experts: int) -> dict[str, Any]:
    return {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "num_hidden_layers": layers,
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 201088,
        "max_position_embeddings": 131072,
        "rope_theta": 150000,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 4096,
        },
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-05,
        "attention_bias": True,
        "num_local_experts": experts,
        "num_experts_per_tok": 4,
        "experts_per_token": 4,
        "sliding_window": 128,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        "eos_token_id": 200002,
        "pad_token_id": 199999,
    }


def _phi3_mini() -> dict[str, Any]:
    return {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "num_hidden_layers": 32,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32064,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "sliding_window": 2047,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-05,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 32000,
    }


def _phi4_mini() -> dict[str, Any]:
    return {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "num_hidden_layers": 32,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "partial_rotary_factor": 0.75,
        "vocab_size": 200064,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        # longrope carries 48 per-dimension long/short factors in the real file; the catalog keeps the type.
        "rope_scaling": {"rope_type": "longrope"},
        "sliding_window": 262144,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-05,
        "torch_dtype": "bfloat16",
        "bos_token_id": 199999,
        "eos_token_id": 199999,
    }


def _phi4() -> dict[str, Any]:
    """microsoft/phi-4 (14B): Phi3ForCausalLM with full rotary and no rope scaling."""
    return {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "num_hidden_layers": 40,
        "hidden_size": 5120,
        "intermediate_size": 17920,
        "num_attention_heads": 40,
        "num_key_value_heads": 10,
        "vocab_size": 100352,
        "max_position_embeddings": 16384,
        "original_max_position_embeddings": 16384,
        "rope_theta": 250000,
        "rope_scaling": None,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-05,
        "attention_bias": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 100257,
    }


def _entries() -> list[CatalogEntry]:
    qwen_len = 151669  # 151643 BPE tokens + 26 special tokens
    return [
        CatalogEntry("Qwen/Qwen3-0.6B", _qwen3(28, 1024, 3072, 16, tie=True), qwen_len, "0.6B"),
        CatalogEntry("Qwen/Qwen3-1.7B", _qwen3(28, 2048, 6144, 16, tie=True), qwen_len, "1.7B"),
        CatalogEntry("Qwen/Qwen3-4B", _qwen3(36, 2560, 9728, 32, tie=True), qwen_len, "4.0B"),
        CatalogEntry("Qwen/Qwen3-8B", _qwen3(36, 4096, 12288, 32, tie=False), qwen_len, "8.2B"),
        CatalogEntry("Qwen/Qwen3-14B", _qwen3(40, 5120, 17408, 40, tie=False), qwen_len, "14.8B"),
        CatalogEntry("Qwen/Qwen3-32B", _qwen3(64, 5120, 25600, 64, tie=False), qwen_len, "32.8B"),
        CatalogEntry("Qwen/Qwen3-30B-A3B", _qwen3_moe(48, 2048, 768, 32), qwen_len, "30.5B total / 3.3B active"),
        CatalogEntry("Qwen/Qwen3-235B-A22B", _qwen3_moe(94, 4096, 1536, 64), qwen_len, "235B total / 22B active"),
        CatalogEntry("meta-llama/Llama-3.1-8B-Instruct", _llama3(32, 4096, 14336, 32, 8.0, False, False), 128256, "8B"),
        CatalogEntry(
            "meta-llama/Llama-3.1-70B-Instruct", _llama3(80, 8192, 28672, 64, 8.0, False, False), 128256, "70B"
        ),
        CatalogEntry(
            "meta-llama/Llama-3.2-1B-Instruct", _llama3(16, 2048, 8192, 32, 32.0, True, True), 128256, "1.23B"
        ),
        CatalogEntry(
            "meta-llama/Llama-3.2-3B-Instruct", _llama3(28, 3072, 8192, 24, 32.0, True, True), 128256, "3.21B"
        ),
        CatalogEntry(
            "meta-llama/Llama-3.3-70B-Instruct", _llama3(80, 8192, 28672, 64, 8.0, False, True), 128256, "70B"
        ),
        CatalogEntry("microsoft/Phi-3-mini-4k-instruct", _phi3_mini(), 32011, "3.8B"),
        CatalogEntry("microsoft/Phi-4-mini-instruct", _phi4_mini(), None, "3.8B"),
        CatalogEntry("microsoft/phi-4", _phi4(), None, "14.7B"),
        CatalogEntry("openai/gpt-oss-20b", _gpt_oss(24, 32), 200019, "21B total / 3.6B active"),
        CatalogEntry("openai/gpt-oss-120b", _gpt_oss(36, 128), 200019, "117B total / 5.1B active"),
    ]


_CATALOG = {entry.hub_id.lower(): entry for entry in _entries()}


def lookup(hub_id: str) -> CatalogEntry | None:
    """The catalog entry for a Hub id (case-insensitive), or None. Returns a copy the caller may change."""
    entry = _CATALOG.get(hub_id.lower())
    return None if entry is None else copy.deepcopy(entry)


def hub_ids() -> list[str]:
    return [entry.hub_id for entry in _CATALOG.values()]
