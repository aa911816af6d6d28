"""Chat rendering and assistant loss masks, checked token by token against hand-written expectations."""

from __future__ import annotations

import pytest

from spectool.chat_format import ChatFormat, ChatTemplateError, Message
from spectool.conversations import Conversation
from spectool.errors import SpectoolError
from spectool.training.batches import tokenize_conversations
from tests.training.conftest import CHATML_TEMPLATE, QWEN3_LIKE_TEMPLATE, build_tokenizer

CONVERSATION = Conversation(
    [
        Message("system", "be nice"),
        Message("user", "hi"),
        Message("assistant", "hello there"),
        Message("user", "how is it going ?"),
        Message("assistant", "fine , thanks"),
    ],
    source="hand.jsonl",
    line=1,
)

S, U = [("<|im_start|>", 0), ("system", 0), ("\n", 0), ("be", 0), (" ", 0), ("nice", 0)], ("<|im_end|>", 0)
PREFIX = [*S, U, ("\n", 0), ("<|im_start|>", 0), ("user", 0), ("\n", 0), ("hi", 0), U, ("\n", 0)]
SECOND_USER = [("<|im_start|>", 0), ("user", 0), ("\n", 0)]
SECOND_USER += [("how", 0), (" ", 0), ("is", 0), (" ", 0), ("it", 0), (" ", 0), ("going", 0), (" ", 0), ("?", 0)]
SECOND_USER += [U, ("\n", 0)]
HEADER = [("<|im_start|>", 0), ("assistant", 0), ("\n", 0)]


def answer(words: list[str], supervised: int) -> list[tuple[str, int]]:
    """An answer's tokens and its end-of-turn token (supervised or not), then the template's newline (never)."""
    return [(word, supervised) for word in words] + [("<|im_end|>", supervised), ("\n", 0)]


FIRST = ["hello", " ", "there"]
SECOND = ["fine", " ", ",", " ", "thanks"]
THINK = [("<think>", 0), ("\n\n", 0), ("</think>", 0), ("\n\n", 0)]


def tokens_and_mask(chat_format: ChatFormat, conversation=CONVERSATION, turns="all") -> list[tuple[str, int]]:
    example = chat_format.tokenize(conversation.messages, turns)
    tokens = chat_format.tokenizer.convert_ids_to_tokens(example.input_ids)
    return list(zip(tokens, example.loss_mask, strict=True))


def test_chatml_every_assistant_turn(chatml_tokenizer):
    expected = PREFIX + HEADER + answer(FIRST, 1) + SECOND_USER + HEADER + answer(SECOND, 1)
    assert tokens_and_mask(ChatFormat(chatml_tokenizer)) == expected


def test_chatml_last_turn_only(chatml_tokenizer):
    expected = PREFIX + HEADER + answer(FIRST, 0) + SECOND_USER + HEADER + answer(SECOND, 1)
    assert tokens_and_mask(ChatFormat(chatml_tokenizer), turns="last") == expected


def test_end_of_turn_is_probed_from_the_template(chatml_tokenizer):
    chat_format = ChatFormat(chatml_tokenizer)
    assert chat_format.end_of_turn == "<|im_end|>"
    assert chat_format.stop_token_ids == [chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_qwen3_like_empty_think_block_is_not_supervised(qwen3_like_tokenizer):
    # The last turn opens with the template's empty think block; the earlier one is rendered without it.
    expected = PREFIX + HEADER + answer(FIRST, 1) + SECOND_USER + HEADER + THINK + answer(SECOND, 1)
    assert tokens_and_mask(ChatFormat(qwen3_like_tokenizer)) == expected


def test_qwen3_like_with_thinking_disabled_in_the_generation_prompt(qwen3_like_tokenizer):
    # enable_thinking=False puts the empty block into the generation prompt: the supervised tokens are the same.
    chat_format = ChatFormat(qwen3_like_tokenizer, template_kwargs={"enable_thinking": False})
    prompt = chat_format.render(CONVERSATION.messages[:2], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    expected = PREFIX + HEADER + answer(FIRST, 1) + SECOND_USER + HEADER + THINK + answer(SECOND, 1)
    assert tokens_and_mask(chat_format) == expected


def test_qwen3_like_last_turn_only(qwen3_like_tokenizer):
    expected = PREFIX + HEADER + answer(FIRST, 0) + SECOND_USER + HEADER + THINK + answer(SECOND, 1)
    assert tokens_and_mask(ChatFormat(qwen3_like_tokenizer), turns="last") == expected


def test_a_real_think_block_in_the_answer_is_supervised(qwen3_like_tokenizer):
    conversation = Conversation([Message("user", "hi"), Message("assistant", "<think>\nok\n</think>\n\nyes")], "x", 1)
    pairs = tokens_and_mask(ChatFormat(qwen3_like_tokenizer), conversation)
    # The template's empty block comes first (unsupervised), then the model's own thinking (supervised).
    supervised = [token for token, mask in pairs if mask]
    assert supervised == ["<think>", "\n", "ok", "\n", "</think>", "\n\n", "yes", "<|im_end|>"]


def test_override_template(chatml_tokenizer):
    # The ChatML tokenizer rendered with the Qwen3-like template given as an override.
    chat_format = ChatFormat(chatml_tokenizer, chat_template=QWEN3_LIKE_TEMPLATE)
    expected = PREFIX + HEADER + answer(FIRST, 1) + SECOND_USER + HEADER + THINK + answer(SECOND, 1)
    assert tokens_and_mask(chat_format) == expected


def test_consecutive_turns_and_assistant_first(chatml_tokenizer):
    conversation = Conversation(
        [Message("user", "hi"), Message("assistant", "yes"), Message("assistant", "no")], source="x", line=1
    )
    supervised = [token for token, mask in tokens_and_mask(ChatFormat(chatml_tokenizer), conversation) if mask]
    assert supervised == ["yes", "<|im_end|>", "no", "<|im_end|>"]


def test_no_chat_template_is_an_error():
    tokenizer = build_tokenizer(CHATML_TEMPLATE)
    tokenizer.chat_template = None
    with pytest.raises(SpectoolError, match="no chat template"):
        ChatFormat(tokenizer)
    assert ChatFormat(tokenizer, chat_template=CHATML_TEMPLATE).end_of_turn == "<|im_end|>"


def test_template_failures_name_the_row(chatml_tokenizer):
    # A template whose rendering of earlier turns depends on the conversation's length cannot be masked.
    counting = "{{- messages | length }}" + CHATML_TEMPLATE
    chat_format = ChatFormat(chatml_tokenizer, chat_template=counting)
    with pytest.raises(ChatTemplateError, match=r"hand.jsonl:1: assistant turn 1: the chat template renders"):
        tokenize_conversations([CONVERSATION], chat_format, max_length=64)
    raising = "{{- raise_exception('only user turns, please') }}"
    with pytest.raises(ChatTemplateError, match="the chat template failed: only user turns, please"):
        ChatFormat(chatml_tokenizer, chat_template=raising)
    examples, report = tokenize_conversations([CONVERSATION], chat_format, max_length=64, skip_bad_rows=True)
    assert examples == [] and report.rows_skipped == 1 and report.reasons[0].startswith("hand.jsonl:1:")


def test_turns_closed_by_different_tokens(chatml_tokenizer):
    # gpt-oss style: the final assistant turn ends with one token (here <|endoftext|>), earlier ones with another.
    template = (
        "{%- for message in messages %}"
        "{%- set close = '<|endoftext|>' if loop.last and message['role'] == 'assistant' else '<|im_end|>\\n' %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + close }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    chat_format = ChatFormat(chatml_tokenizer, chat_template=template)
    assert chat_format.end_of_turn == "<|endoftext|>" and chat_format.end_of_turn_texts == (
        "<|endoftext|>",
        "<|im_end|>",
    )
    supervised = [token for token, mask in tokens_and_mask(chat_format) if mask]
    assert supervised == [*FIRST, "<|im_end|>", *SECOND, "<|endoftext|>"]
