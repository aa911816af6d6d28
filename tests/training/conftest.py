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
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from spectool import hub

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
THINK_TOKENS = ("<think>", "</think>")
WORDS = (
    "system user assistant you are be a nice helpful bot hi hello there how is it going fine thanks what the time now "
    "one two three four five six seven eight nine ten yes no maybe tell me about cats dogs they like to sleep "
    "and play good morning evening night see later bye please write code print def return x y z if else for in "
    "of on with this that answer question ok sure"
).split()
PUNCTUATION = ("?", "!", ".", ",", ":", "(", ")", "=", "+", "'")
WHITESPACE = ("\n", "\n\n", " ", "  ", "    ")

#: Plain ChatML: <|im_start|>role\ncontent<|im_end|>\n per message.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

#: Qwen3-like ChatML: assistant turns after the last user turn open with an empty think block (earlier ones are
#: rendered without it, as Qwen3 drops reasoning from the history); enable_thinking=false puts the empty block
#: into the generation prompt.
QWEN3_LIKE_TEMPLATE = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and loop.index0 > ns.last_query %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def build_tokenizer(chat_template: str = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *THINK_TOKENS, "[UNK]", *WHITESPACE, *PUNCTUATION, *WORDS):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+|\w+|[^\w\s]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        chat_template=chat_template,
    )


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
