"""`spectool data vocab` on a tiny random chat target: the most frequent supervised tokens, written beside the draft
(draft_vocab.safetensors), read back by load_draft and decoded with losslessly."""

import json

import pytest
import torch

from spectool.checkpoint import draft_vocab, load_draft
from spectool.draft_init import init_draft
from spectool.draft_vocab import VOCAB_FILE, read_draft_vocab, write_draft_vocab
from spectool.errors import SpectoolError
from tests.cli.conftest import invoke

ANSWERS = ["seven seven seven seven seven", "cats and dogs like to sleep", "seven seven yes"]


@pytest.fixture
def conversations(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": a}]} for a in ANSWERS
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("method", ["dflash", "dspark", "eagle1"])
def test_vocab_keeps_the_most_frequent_answer_tokens_and_decoding_stays_lossless(
    method, chat_target_dir, conversations, tmp_path
):
    from transformers import AutoTokenizer

    draft = init_draft(str(chat_target_dir), method, tmp_path / method, dtype="float32").path
    result = invoke("data", "vocab", "--draft", str(draft), "--size", "2", "--data", str(conversations), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    tokenizer = AutoTokenizer.from_pretrained(chat_target_dir)
    seven, space = tokenizer.convert_tokens_to_ids(["seven", " "])  # 7 and 6 of the answers' tokens, by hand
    assert read_draft_vocab(draft).tolist() == sorted([seven, space])
    assert summary["size"] == 2 and summary["examples"] == 3 and 0.5 < summary["coverage"] < 1
    assert draft_vocab(load_draft(draft)).tolist() == sorted([seven, space])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi there"}\n{"prompt": "tell me about cats"}\n')
    bench = ["bench", "--draft", str(draft), "--prompts", str(prompts), "-n", "12", "--verify", "full"]
    result = invoke(*bench, "--baselines", "target", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["lossless"] is True
    assert "note: drafting over 2 of the target's tokens" in result.stderr and "warning" not in result.stderr


def test_vocab_usage_errors(chat_target_dir, conversations, tmp_path):
    eagle3 = init_draft(str(chat_target_dir), "eagle3", tmp_path / "eagle3", dtype="float32").path
    result = invoke("data", "vocab", "--draft", str(eagle3), "--size", "2", "--data", str(conversations))
    assert result.exit_code == 2 and "EAGLE-3 keeps its own" in result.output
    dflash = init_draft(str(chat_target_dir), "dflash", tmp_path / "dflash", dtype="float32").path
    result = invoke("data", "vocab", "--draft", str(dflash), "--size", "2")
    assert result.exit_code == 2 and "records no training data; give --data" in result.output
    result = invoke("data", "vocab", "--draft", str(dflash), "--size", "100000", "--data", str(conversations))
    assert result.exit_code == 2 and "--size must be in" in result.output


def test_a_bad_vocabulary_file_is_one_line_error(chat_target_dir, tmp_path):
    draft = init_draft(str(chat_target_dir), "dflash", tmp_path / "dflash", dtype="float32").path
    write_draft_vocab(draft, torch.tensor([3, 1, 100000]))
    with pytest.raises(SpectoolError, match="written for another target"):
        draft_vocab(load_draft(draft))
    (draft / VOCAB_FILE).write_bytes(b"not safetensors")
    with pytest.raises(SpectoolError, match="not a readable safetensors file"):
        draft_vocab(load_draft(draft))
    with pytest.raises(SpectoolError, match="distinct, non-negative and ascending"):
        write_draft_vocab(draft, torch.tensor([1, 1]))
    eagle3 = init_draft(str(chat_target_dir), "eagle3", tmp_path / "eagle3", dtype="float32").path
    write_draft_vocab(eagle3, torch.tensor([1, 2]))
    with pytest.raises(SpectoolError, match="keeps its own in d2t"):
        draft_vocab(load_draft(eagle3))


def test_vocab_rewrites_a_file_that_no_longer_loads(chat_target_dir, conversations, tmp_path):
    """The errors above say "rewrite it with `spectool data vocab`": that command must not trip over the file."""
    draft = init_draft(str(chat_target_dir), "dflash", tmp_path / "dflash", dtype="float32").path
    (draft / VOCAB_FILE).write_bytes(b"not safetensors")
    result = invoke("data", "vocab", "--draft", str(draft), "--size", "2", "--data", str(conversations))
    assert result.exit_code == 0, result.output
    assert draft_vocab(load_draft(draft)).numel() == 2
