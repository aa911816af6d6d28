"""Truncation, padding, packing, document masks, resumable shuffled batches, and the held-out split."""

from __future__ import annotations

import pytest
import torch

from spectool.chat_format import ChatFormat, Message, TokenizedExample
from spectool.conversations import Conversation
from spectool.errors import SpectoolError, UsageError
from spectool.training.batches import (
    ShuffledBatches,
    collate,
    length_grouped,
    pack_examples,
    pad_token_id,
    split_heldout,
    tokenize_conversations,
)


def example(ids: list[int], mask: list[int] | None = None) -> TokenizedExample:
    return TokenizedExample(ids, mask if mask is not None else [1] * len(ids))


def test_truncation_and_dropping_unsupervised(chatml_tokenizer):
    chat_format = ChatFormat(chatml_tokenizer)
    short = Conversation([Message("user", "hi"), Message("assistant", "hello")], "d.jsonl", 1)
    long_prompt = Conversation(
        [Message("user", " ".join(["one two three"] * 10)), Message("assistant", "yes")], "d.jsonl", 2
    )
    full = chat_format.tokenize(long_prompt.messages)
    examples, report = tokenize_conversations([short, long_prompt], chat_format, max_length=12)
    # <|im_start|> user \n hi <|im_end|> \n <|im_start|> assistant \n hello <|im_end|> \n: 12 tokens, fits.
    assert len(examples) == 1 and len(examples[0]) == 12 and examples[0].num_supervised == 2
    assert (report.truncated, report.dropped_unsupervised, report.examples) == (1, 1, 1)
    assert report.tokens == 12 and report.supervised_tokens == 2
    kept = full.truncated(len(full) - 2)  # cut inside the answer: its first tokens stay supervised
    assert kept.input_ids == full.input_ids[:-2] and kept.loss_mask == full.loss_mask[:-2]


def test_collate_right_pads(chatml_tokenizer):
    pad = pad_token_id(chatml_tokenizer)
    assert pad == chatml_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    batch = collate([example([5, 6, 7], [0, 1, 1]), example([8])], pad)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.loss_mask.tolist() == [[0, 1, 1], [1, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert batch.document_ids.tolist() == [[0, 0, 0], [0, -1, -1]]
    assert all(t.dtype == torch.long for t in (batch.input_ids, batch.loss_mask, batch.position_ids))
    assert collate([example([5])], pad, pad_to=4).input_ids.shape == (1, 4)
    assert batch.num_tokens == 4


def test_packing_restarts_positions_per_document():
    docs = [example([1, 2, 3], [0, 1, 1]), example([4, 5], [0, 1]), example([6, 7, 8, 9]), example([10] * 9)]
    rows = pack_examples(docs, max_length=6)
    assert [row.input_ids for row in rows] == [[1, 2, 3, 4, 5], [6, 7, 8, 9], [10] * 6]
    assert rows[0].position_ids == [0, 1, 2, 0, 1]
    assert rows[0].document_ids == [0, 0, 0, 1, 1]
    assert rows[0].loss_mask == [0, 1, 1, 0, 1]
    assert rows[2].position_ids == list(range(6))  # a too-long document is truncated to the row length
    batch = collate(rows, 0)
    assert batch.position_ids[0].tolist() == [0, 1, 2, 0, 1, 2]  # padding keeps counting from the last document
    assert batch.document_ids[0].tolist() == [0, 0, 0, 1, 1, -1]


def test_packing_through_tokenize_conversations(chatml_tokenizer):
    chat_format = ChatFormat(chatml_tokenizer)
    conversations = [
        Conversation([Message("user", "hi"), Message("assistant", w)], "d", i) for i, w in enumerate("xyz")
    ]
    unpacked, _ = tokenize_conversations(conversations, chat_format, max_length=30)
    packed, report = tokenize_conversations(conversations, chat_format, max_length=30, pack=True)
    assert len(packed) == 2 and report.examples == 2  # 12 + 12 tokens, then 12
    assert packed[0].input_ids == unpacked[0].input_ids + unpacked[1].input_ids
    assert packed[0].loss_mask == unpacked[0].loss_mask + unpacked[1].loss_mask
    assert packed[0].position_ids == list(range(12)) * 2


def test_document_attention_mask():
    batch = collate([TokenizedExample([1, 2, 3], [1, 1, 1], [0, 1, 0], [0, 0, 1]), example([4])], 0)
    mask = batch.document_attention_mask()
    assert mask.shape == (2, 1, 3, 3) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert mask[1, 0].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]  # padding attends to itself only


def collect(batches: ShuffledBatches, count: int) -> list[list[list[int]]]:
    return [next(batches).input_ids.tolist() for _ in range(count)]


DATA = [example([i] * (1 + i % 3)) for i in range(10)]


def test_shuffled_batches_are_seeded_and_cover_each_epoch():
    first = collect(ShuffledBatches(DATA, 3, 0, seed=1), 8)
    assert first == collect(ShuffledBatches(DATA, 3, 0, seed=1), 8)
    assert first != collect(ShuffledBatches(DATA, 3, 0, seed=2), 8)
    loader = ShuffledBatches(DATA, 3, 0, seed=1)
    assert len(loader) == 4
    for _ in range(2):  # each epoch serves every example once; epochs differ in order
        served = [row[0] for _ in range(4) for row in next(loader).input_ids.tolist()]
        assert sorted(served) == list(range(10))
    assert ShuffledBatches(DATA, 3, 0, drop_last=True).__len__() == 3


def test_state_dict_resume_gives_the_same_next_batches():
    loader = ShuffledBatches(DATA, 3, 0, seed=5)
    collect(loader, 3)
    state = loader.state_dict()
    expected = collect(loader, 6)  # crosses into the next epoch
    restored = ShuffledBatches(DATA, 3, 0, seed=5)
    restored.load_state_dict(state)
    assert collect(restored, 6) == expected
    assert state["epoch"] == 0 and state["position"] == 9


def test_state_dict_refuses_other_data_or_seed():
    state = ShuffledBatches(DATA, 3, 0, seed=5).state_dict()
    with pytest.raises(SpectoolError, match="other data"):
        ShuffledBatches(DATA[:-1], 3, 0, seed=5).load_state_dict(state)
    with pytest.raises(SpectoolError, match="seed 5"):
        ShuffledBatches(DATA, 3, 0, seed=6).load_state_dict(state)


def test_length_grouped_order():
    lengths = [(7 * i) % 97 + 1 for i in range(1000)]
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist()
    grouped = length_grouped(order, lengths, 8, torch.Generator().manual_seed(1))
    assert sorted(grouped) == list(range(1000))  # every example once

    def padded(sequence):  # tokens computed with right padding to each batch's longest row
        return sum(8 * max(lengths[i] for i in sequence[b : b + 8]) for b in range(0, 1000, 8))

    assert padded(grouped) < 0.6 * padded(order)
    assert max(lengths[i] for i in grouped[:8]) == max(lengths)  # the longest batch comes first
    assert grouped == length_grouped(order, lengths, 8, torch.Generator().manual_seed(1))
    assert grouped != length_grouped(order, lengths, 8, torch.Generator().manual_seed(2))
    # a partial last batch stays last; batch size 1 keeps the shuffled order
    odd = length_grouped(order[: 1003 - 8], lengths, 8, torch.Generator().manual_seed(1))
    assert sorted(odd) == sorted(order[:995]) and set(odd[-3:]) <= set(order[:995])
    assert length_grouped(order, lengths, 1, torch.Generator()) == order


def test_shuffled_batches_group_similar_lengths():
    data = [example([i] * (1 + (5 * i) % 40)) for i in range(400)]  # lengths 1, 6, ..., 36
    loader = ShuffledBatches(data, 4, 0, seed=3)
    widths = [next(loader).input_ids.shape[1] for _ in range(len(loader))]
    assert widths[0] == 36  # the longest batch first
    shuffled = torch.randperm(400, generator=torch.Generator().manual_seed(3)).tolist()
    random_widths = [max(len(data[i]) for i in shuffled[b : b + 4]) for b in range(0, 400, 4)]
    assert sum(widths) < 0.75 * sum(random_widths)


def test_accumulated_micro_batches_hold_the_examples_of_one_batch():
    data = [example([i] * (1 + (5 * i) % 40)) for i in range(400)]
    whole, micro = ShuffledBatches(data, 4, 0, seed=3), ShuffledBatches(data, 2, 0, seed=3, batches_per_step=2)
    for _ in range(150):  # crosses an epoch
        rows = sorted(next(micro).input_ids[:, 0].tolist() + next(micro).input_ids[:, 0].tolist())
        assert rows == sorted(next(whole).input_ids[:, 0].tolist())


def test_finite_epochs_and_drop_last():
    loader = ShuffledBatches(DATA, 4, 0, drop_last=True, num_epochs=2)
    sizes = [batch.input_ids.shape[0] for batch in loader]
    assert sizes == [4, 4, 4, 4]


def test_split_heldout():
    items = list(range(20))
    train, held = split_heldout(items, 0.25, seed=3)
    assert (len(train), len(held)) == (15, 5) and sorted(train + held) == items
    assert train == sorted(train) and held == sorted(held)  # input order kept
    assert split_heldout(items, 0.25, seed=3) == (train, held)
    assert split_heldout(items, 0.25, seed=4) != (train, held)
    assert len(split_heldout(items[:3], 0.01)[1]) == 1
    assert split_heldout(items, 0.0) == (items, [])
    with pytest.raises(UsageError):
        split_heldout(items, 1.0)
