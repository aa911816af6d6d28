"""Fixtures for the training-data tests: a word-level ChatML tokenizer and a tiny random Qwen3 target on disk.

The tokenizer splits text into words, whitespace runs and punctuation runs over a fixed vocabulary, so expected
token sequences (and loss masks) can be written down by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from spectool import hub
from tests.chat_tokenizer import CHATML_TEMPLATE, QWEN3_LIKE_TEMPLATE, build_tokenizer


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test here may reach the Hub."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub._hub_unreachable.cache_clear()


@pytest.fixture(scope="session")
def chatml_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(CHATML_TEMPLATE)


@pytest.fixture(scope="session")
def qwen3_like_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(QWEN3_LIKE_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory, chatml_tokenizer) -> Path:
    """A saved 2-layer, 64-wide random Qwen3 with the ChatML word tokenizer (vocab = len(tokenizer))."""
    directory = tmp_path_factory.mktemp("tiny-target")
    config = Qwen3Config(
        vocab_size=len(chatml_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=chatml_tokenizer.eos_token_id,
        pad_token_id=chatml_tokenizer.pad_token_id,
        architectures=["Qwen3ForCausalLM"],
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        # A wider spread of logits than the default init, so greedy decoding is not near a tie; a stronger
        # <|im_end|> row, so some answers end before max_new_tokens and others do not.
        model.lm_head.weight.normal_(0.0, 0.5)
        model.lm_head.weight[chatml_tokenizer.eos_token_id] *= 2.5
    model.generation_config.eos_token_id = chatml_tokenizer.eos_token_id
    model.generation_config.pad_token_id = chatml_tokenizer.pad_token_id
    model.save_pretrained(directory)
    chatml_tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path
