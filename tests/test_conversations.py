"""Loading conversations: formats, ShareGPT variants, directories, Hub datasets, bad rows, ids."""

from __future__ import annotations

import json
import sys

import pytest

from spectool.chat_format import Message
from spectool.conversations import load_conversations
from spectool.errors import SpectoolError, UsageError
from tests.training.conftest import write_jsonl

OPENAI_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
EXPECTED = [Message("user", "hi"), Message("assistant", "hello")]


def test_jsonl_openai_messages(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(OPENAI_ROW) + "\n\n" + json.dumps({**OPENAI_ROW, "id": 7}) + "\n")
    conversations, report = load_conversations(path)
    assert [c.messages for c in conversations] == [EXPECTED, EXPECTED]
    assert [c.line for c in conversations] == [1, 3]  # the blank line 2 is ignored
    assert conversations[0].source == str(path) and conversations[1].id == "7"
    assert (report.rows_read, report.rows_loaded, report.rows_skipped) == (2, 2, 0)


@pytest.mark.parametrize(
    "turns",
    [
        [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
        [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "hello"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    ],
    ids=["human-gpt", "user-assistant", "role-content"],
)
def test_sharegpt_variants(tmp_path, turns):
    conversations, _ = load_conversations(write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": turns}]))
    assert conversations[0].messages == EXPECTED


def test_sharegpt_system_turn(tmp_path):
    row = {"conversations": [{"from": "system", "value": "be nice"}, *OPENAI_ROW["messages"]]}
    conversations, _ = load_conversations(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert conversations[0].messages == [Message("system", "be nice"), *EXPECTED]


@pytest.mark.parametrize(
    "content",
    [
        [OPENAI_ROW, OPENAI_ROW],
        {"train": [OPENAI_ROW, OPENAI_ROW], "version": 1},
    ],
    ids=["list", "object-holding-a-list"],
)
def test_json_file(tmp_path, content):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(content))
    conversations, _ = load_conversations(path)
    assert [c.messages for c in conversations] == [EXPECTED, EXPECTED]
    assert [c.line for c in conversations] == [1, 2]


def test_json_single_row_and_jsonl_named_json(tmp_path):
    single = tmp_path / "one.json"
    single.write_text(json.dumps(OPENAI_ROW))
    assert load_conversations(single)[0][0].messages == EXPECTED
    lines = tmp_path / "lines.json"
    lines.write_text(json.dumps(OPENAI_ROW) + "\n" + json.dumps(OPENAI_ROW) + "\n")
    assert len(load_conversations(lines)[0]) == 2


def test_json_object_with_two_lists_is_an_error(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"train": [OPENAI_ROW], "test": [OPENAI_ROW]}))
    with pytest.raises(SpectoolError, match="object holding one list"):
        load_conversations(path)


def test_parquet(tmp_path):
    parquet = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    path = tmp_path / "data.parquet"
    parquet.write_table(pyarrow.Table.from_pylist([OPENAI_ROW, {**OPENAI_ROW}]), path)
    conversations, _ = load_conversations(path)
    assert [c.messages for c in conversations] == [EXPECTED, EXPECTED]


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(SpectoolError, match=r"pip install pyarrow") as caught:
        load_conversations(path)
    assert "\n" not in str(caught.value)


def test_directory(tmp_path):
    (tmp_path / "b").mkdir()
    write_jsonl(tmp_path / "b" / "part2.jsonl", [OPENAI_ROW])
    write_jsonl(tmp_path / "a.jsonl", [OPENAI_ROW, OPENAI_ROW])
    (tmp_path / "dataset_info.json").write_text("{}")  # Hub metadata, not rows
    (tmp_path / ".hidden.jsonl").write_text("not json\n")
    (tmp_path / "README.md").write_text("# data")
    conversations, report = load_conversations(tmp_path)
    assert report.files == [str(tmp_path / "a.jsonl"), str(tmp_path / "b" / "part2.jsonl")]
    assert len(conversations) == 3


def test_hub_dataset_downloads_only_data_files(tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    (snapshot / "data").mkdir(parents=True)
    write_jsonl(snapshot / "data" / "train.jsonl", [OPENAI_ROW])
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    conversations, _ = load_conversations("someone/chat-data", revision="v1")
    assert conversations[0].messages == EXPECTED
    repo_id, kwargs = calls[0]
    assert repo_id == "someone/chat-data" and kwargs["repo_type"] == "dataset" and kwargs["revision"] == "v1"
    assert set(kwargs["allow_patterns"]) >= {"*.jsonl", "*.json", "*.parquet"}


def test_hub_dataset_not_cached_offline():
    with pytest.raises(SpectoolError, match="not in the local cache") as caught:
        load_conversations("someone/never-downloaded")
    assert caught.value.exit_code == 1


def test_missing_or_unsupported_file_is_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_conversations(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(UsageError, match="unsupported file type"):
        load_conversations(tmp_path / "data.csv")


def test_prompt_rows_for_regeneration_only(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "tell me about cats"}])
    conversations, _ = load_conversations(path, require="prompt")
    assert conversations[0].messages == [Message("user", "tell me about cats")]
    with pytest.raises(SpectoolError, match=r"prompts.jsonl:1: no assistant turn"):
        load_conversations(path)


BAD_ROWS = [
    ('{"messages": [', "not valid JSON"),
    ('{"messages": "a\tb"}', "not valid JSON (Invalid control character at column 16)"),  # json says "...at"
    ("[1, 2]", "expected a JSON object"),
    ('{"text": "hi"}', "no 'messages', 'conversations' or 'prompt'"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"content": "hi"}]}', "messages[0] has no 'role'"),
    ('{"messages": [{"role": "user"}]}', "messages[0] has no 'content'"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": ["hi"]}]}', "messages[0].content is a list, not a string"),
    ('{"conversations": [{"from": "human", "value": null}]}', "conversations[0].value is null"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
]


@pytest.mark.parametrize("line, reason", BAD_ROWS, ids=[reason for _, reason in BAD_ROWS])
def test_bad_row_is_named_by_file_and_line(tmp_path, line, reason):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(OPENAI_ROW) + "\n" + line + "\n")
    with pytest.raises(SpectoolError) as caught:
        load_conversations(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:2: ") and reason in message and "\n" not in message
    assert caught.value.exit_code == 1


def test_bad_row_in_json_names_the_row(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([OPENAI_ROW, {"messages": "hi"}]))
    with pytest.raises(SpectoolError, match=r"data.json, row 2: 'messages' must be a non-empty list"):
        load_conversations(path)


def test_skip_bad_rows_counts_and_reports(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(OPENAI_ROW)] + [line for line, _ in BAD_ROWS] + [json.dumps(OPENAI_ROW)]
    path.write_text("\n".join(lines) + "\n")
    conversations, report = load_conversations(path, skip_bad_rows=True)
    assert len(conversations) == 2
    assert (report.rows_read, report.rows_loaded, report.rows_skipped) == (len(BAD_ROWS) + 2, 2, len(BAD_ROWS))
    assert len(report.reasons) == 5 and report.reasons[0].startswith(f"{path}:2: not valid JSON")


def test_only_bad_rows_is_an_error_even_when_skipping(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("{}\n")
    with pytest.raises(SpectoolError, match="no usable rows"):
        load_conversations(path, skip_bad_rows=True)


def test_regeneration_needs_a_user_turn_first(tmp_path):
    row = {"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}]}
    with pytest.raises(SpectoolError, match="assistant turn comes before the first user turn"):
        load_conversations(write_jsonl(tmp_path / "d.jsonl", [row]), require="prompt")


def test_a_sharegpt_row_that_opens_with_an_assistant_turn_loses_that_turn(tmp_path):
    """FastChat's and EAGLE's ShareGPT readers drop a conversation's opening gpt turn (ShareGPT splits long
    conversations, so a piece can open mid-answer); OpenAI-style rows keep the strict check above."""
    turns = [
        {"from": "gpt", "value": "...the rest"},
        {"from": "human", "value": "go on"},
        {"from": "gpt", "value": "ok"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "x", "conversations": turns}])
    for require in ("prompt", "assistant"):
        conversations, report = load_conversations(path, require=require)
        assert [(m.role, m.content) for m in conversations[0].messages] == [("user", "go on"), ("assistant", "ok")]
        assert report.leading_assistant_dropped == 1 and "open with an assistant turn" in report.notes[0]


def test_ids_are_stable_and_unique(tmp_path):
    other = {"messages": [{"role": "user", "content": "yo"}, {"role": "assistant", "content": "hey"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [OPENAI_ROW, other, OPENAI_ROW, {**other, "id": "mine"}])
    first = [c.id for c in load_conversations(path)[0]]
    assert first == [c.id for c in load_conversations(path)[0]]
    assert first[2] == first[0] + "#2" and first[3] == "mine" and len(set(first)) == 4
    # The id depends on the turns, not the file: the same row elsewhere keeps its id.
    assert load_conversations(write_jsonl(tmp_path / "e.jsonl", [other]))[0][0].id == first[1]
