"""Byte-level BPE tokenizer with ChatML special tokens for the embedded tiny target.

The layout mirrors Qwen3 at toy scale: special tokens first, a byte-level BPE vocabulary after them, and a
tokenizer that is a bit shorter than the model's ``vocab_size`` (4080 vs 4096 here, 151669 vs 151936 for
Qwen3), so embedding row ``len(tokenizer)`` is free for a DFlash/DSpark mask token.

Byte-level pre-tokenization with the byte-level decoder makes ``decode(encode(text)) == text`` for any
text (spaces, tabs, newlines, code, non-ASCII); :func:`check_round_trip` verifies it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
#: Special tokens in id order: ``<|endoftext|>`` is id 0 (and the pad token), ``<|im_end|>`` ends a turn.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
#: ``len(tokenizer)``: BPE tokens plus the special tokens.
TOKENIZER_LENGTH = 4080

#: ChatML without thinking blocks: ``<|im_start|>role\ncontent<|im_end|>\n`` per message, and
#: ``<|im_start|>assistant\n`` when a generation prompt is asked for.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The same text as :data:`CHAT_TEMPLATE`, in Python (used to build training sequences)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def train_bpe(texts: Iterable[str], length: int = TOKENIZER_LENGTH) -> Tokenizer:
    """Train a byte-level BPE whose total size (BPE + specials) is ``length``.

    The 256 byte symbols are always in the vocabulary, so every byte sequence is encodable. Training is
    deterministic for a given text sequence.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=length,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:
            raise RuntimeError(f"special token {token} got id {tokenizer.token_to_id(token)}, not {expected_id}")
    return tokenizer


def to_transformers(tokenizer: Tokenizer):
    """Wrap a trained ``tokenizers.Tokenizer`` as a transformers fast tokenizer with the chat template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
        padding_side="left",
    )


def check_round_trip(hf_tokenizer, samples: Iterable[str]) -> None:
    """Raise ``AssertionError`` unless every sample decodes back to itself exactly."""
    for text in samples:
        ids = hf_tokenizer.encode(text, add_special_tokens=False)
        back = hf_tokenizer.decode(ids)
        if back != text:
            raise AssertionError(f"tokenizer round trip changed {text!r} into {back!r}")


ROUND_TRIP_SAMPLES = (
    "def f(x):\n    return x  *  2\n\n\n# done\t(tab)\n",
    "  leading spaces, trailing spaces  ",
    'print("héllo, wörld — ünïcode ✓ 数字 🙂")',
    "{'a': [1, 2.5e-3, None]}\r\nwindows line\r\n",
    f"{IM_START}user\nHi{IM_END}\n{IM_START}assistant\n",
)


def save(hf_tokenizer, directory: Path) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (chat template inline) into ``directory``.

    transformers 5 would put the template in a separate ``chat_template.jinja`` and name its own backend
    class; keeping the template inline and naming ``PreTrainedTokenizerFast`` (an alias in transformers
    5, the real class in 4.x) lets more tools read the directory.
    """
    directory = Path(directory)
    hf_tokenizer.save_pretrained(str(directory), save_jinja_files=False)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
