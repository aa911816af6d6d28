"""DFlash and DSpark for Llama targets (z-lab publishes DFlash drafts for Llama-3.1-8B-Instruct): a tiny Llama chat
target whose embedding has no spare row, so the mask token is a special token chat never writes; init, train and
bench run as they do for Qwen3, losslessly."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from spectool import hub
from spectool.checkpoint import load_draft
from tests.chat_tokenizer import build_tokenizer
from tests.cli.conftest import invoke
from tests.conftest import save_chat_target, tiny_llama_config

RESERVED = "<|reserved_special_token_0|>"


@pytest.fixture(scope="module")
def llama_chat_dir(tmp_path_factory):
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [RESERVED]})
    config = tiny_llama_config(
        num_hidden_layers=8,
        vocab_size=len(tokenizer),  # no spare embedding row, as in Llama 3 and SmolLM2
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return save_chat_target(LlamaForCausalLM(config), tmp_path_factory.mktemp("llama-chat"), tokenizer), tokenizer


def test_the_mask_token_is_a_special_token_chat_never_writes(llama_chat_dir):
    directory, tokenizer = llama_chat_dir
    info = hub.resolve_model(str(directory))
    reserved = tokenizer.convert_tokens_to_ids(RESERVED)
    assert info.tokenizer_length == info.arch.vocab_size and info.unused_token_id == reserved
    result = invoke("inspect", str(directory), "--json")
    methods = json.loads(result.stdout)["methods"]
    for name in ("dflash", "dspark"):
        assert methods[name]["supported"] and methods[name]["mask_token_id"] == reserved
        assert methods[name]["draft_class"].startswith("Qwen3")  # the draft is Qwen3-shaped whatever the target


@pytest.mark.parametrize("method", ["dflash", "dspark"])
def test_llama_block_drafts_train_and_bench_losslessly(method, llama_chat_dir, data_file, tmp_path):
    directory, tokenizer = llama_chat_dir
    out = tmp_path / method
    result = invoke(
        "train", "--target", str(directory), "--method", method, "--data", str(data_file), "--out", str(out),
        "--max-steps", "2", "--max-length", "48", "--batch-size", "2", "--num-anchors", "4", "--eval-fraction", "0",
        "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    loaded = load_draft(out)
    assert loaded.method == method and loaded.model.config.mask_token_id == tokenizer.convert_tokens_to_ids(RESERVED)
    bench = invoke("bench", "--draft", str(out), "-n", "10", "--json", "--verify", "full", "--baselines", "target,hf")
    assert bench.exit_code == 0, bench.output
    data = json.loads(bench.stdout)
    assert data["lossless"] is True and data["lossless_vs_hf_generate"] is True
    assert data["acceptance_length"] >= 1.0
