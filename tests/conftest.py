"""Shared fixtures: tiny, seeded, random targets (no network, no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GptOssConfig, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

TINY_VOCAB = 256

# Tiny models are dominated by per-op overhead: one thread is faster than two fighting over two cores.
torch.set_num_threads(1)


def tiny_qwen3_config(**overrides) -> Qwen3Config:
    """4 layers, hidden 64, 4 heads x head_dim 32 (explicit, NOT hidden/heads), 2 kv heads."""
    fields = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        architectures=["Qwen3ForCausalLM"],
    )
    fields.update(overrides)
    return Qwen3Config(**fields)


def tiny_llama_config(**overrides) -> LlamaConfig:
    """3 layers, hidden 64, 4 heads (head_dim derived: 16), llama3 rope scaling in the legacy form."""
    fields = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        },
        rms_norm_eps=1e-5,
        architectures=["LlamaForCausalLM"],
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_gpt_oss_config() -> GptOssConfig:
    """gpt-oss-shaped config (YaRN rope, attention bias, explicit head_dim); only its config is used."""
    return GptOssConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=2,
        num_experts_per_tok=1,
        max_position_embeddings=1024,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 32,
        },
        architectures=["GptOssForCausalLM"],
    )


@pytest.fixture(scope="session")
def qwen3_config() -> Qwen3Config:
    return tiny_qwen3_config()


@pytest.fixture(scope="session")
def llama_config() -> LlamaConfig:
    return tiny_llama_config()


@pytest.fixture(scope="session")
def gpt_oss_config() -> GptOssConfig:
    return tiny_gpt_oss_config()


@pytest.fixture(scope="session")
def qwen3_target(qwen3_config) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(qwen3_config).eval()


@pytest.fixture(scope="session")
def llama_target(llama_config) -> LlamaForCausalLM:
    torch.manual_seed(1)
    return LlamaForCausalLM(llama_config).eval()


@pytest.fixture
def token_ids() -> torch.Tensor:
    """A seeded [2, 12] batch of token ids."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, TINY_VOCAB, (2, 12), generator=generator)


CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory):
    """A saved 8-layer tiny Qwen3 model directory (random weights) with a tokenizer_config.json whose added
    tokens put len(tokenizer) at 250 < vocab 256, so row 250 is a spare mask token."""
    import json

    directory = tmp_path_factory.mktemp("tiny-qwen3")
    torch.manual_seed(0)
    Qwen3ForCausalLM(tiny_qwen3_config(num_hidden_layers=8)).save_pretrained(directory)
    added = {str(i): {"content": f"<|special{i}|>"} for i in range(240, 250)}
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": CHAT_TEMPLATE, "added_tokens_decoder": added})
    )
    return directory


@pytest.fixture(scope="session")
def chat_target_dir(tmp_path_factory):
    """A saved 8-layer random Qwen3 chat model with the word-level ChatML tokenizer and 8 spare embedding rows
    (the first one, len(tokenizer), is the DFlash / DSpark mask token)."""
    from tests.chat_tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    directory = tmp_path_factory.mktemp("chat-target")
    config = tiny_qwen3_config(
        num_hidden_layers=8,
        vocab_size=len(tokenizer) + 8,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return save_chat_target(Qwen3ForCausalLM(config), directory, tokenizer)


def save_chat_target(model, directory: Path, tokenizer) -> Path:
    """Save a random chat target with ``tokenizer``: decisive logits (greedy decoding far from ties) and an
    end-of-turn row at zero, so answers run to max_new_tokens."""
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
        model.lm_head.weight[tokenizer.eos_token_id] = 0.0
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
