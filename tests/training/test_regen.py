"""`spectool data regen` end to end on the tiny target: rows, resumption after a kill, greedy fidelity, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from spectool.chat_format import ChatFormat, Message
from spectool.cli import app
from spectool.conversations import load_conversations
from spectool.hub import load_model_and_tokenizer, resolve_model
from spectool.training.regen import cut_at_stop, read_finished_ids
from tests.training.conftest import write_jsonl

ROWS = [
    {"prompt": "tell me about cats"},
    {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "how is it going ?"},
            {"role": "assistant", "content": "fine"},
        ]
    },
    {"conversations": [{"from": "system", "value": "be nice"}, {"from": "human", "value": "what time"}]},
    {"prompt": "write code", "id": "row-4"},
    {"messages": [{"role": "user", "content": "one two"}, {"role": "user", "content": "three"}]},
]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def target(tiny_target_dir):
    """The tiny target as regen loads it, and its chat format."""
    model, tokenizer = load_model_and_tokenizer(resolve_model(str(tiny_target_dir)))
    return model, ChatFormat(tokenizer)


def greedy_answer(target, messages: list[Message], max_new_tokens: int) -> str:
    """The target's own greedy answer, one prompt at a time (no padding)."""
    model, chat_format = target
    prompt = torch.tensor([chat_format.prompt_ids(messages)])
    with torch.no_grad():
        output = model.generate(
            prompt, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=chat_format.stop_token_ids
        )
    ids, _ = cut_at_stop(output[0, prompt.shape[1] :].tolist(), chat_format.stop_token_ids)
    return chat_format.tokenizer.decode(ids, skip_special_tokens=False)


def run_regen(model_dir: Path, prompts: Path, out: Path, *extra: str):
    return invoke(
        "data", "regen", "--target", str(model_dir), "--prompts", str(prompts), "--out", str(out),
        "--max-new-tokens", "6", *extra,
    )  # fmt: skip


def test_regen_rows_and_greedy_fidelity(tmp_path, tiny_target_dir, target):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    out = tmp_path / "out" / "regen.jsonl"
    result = run_regen(tiny_target_dir, prompts, out, "--batch-size", "2", "--system", "be a bot")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Regenerated 5 rows (6 answers") and f"into {out}" in result.stdout
    expected_ids = [c.id for c in load_conversations(prompts, require="prompt")[0]]
    by_id = {row["id"]: row for row in read_rows(out)}  # written in batches of like length, not in input order
    assert sorted(by_id) == sorted(expected_ids) and expected_ids[3] == "row-4"
    rows = [by_id[row_id] for row_id in expected_ids]
    roles = [[m["role"] for m in row["messages"]] for row in rows]
    assert roles == [
        ["system", "user", "assistant"],
        ["system", "user", "assistant", "user", "assistant"],
        ["system", "user", "assistant"],  # the row's own system turn is kept, --system is not added
        ["system", "user", "assistant"],
        ["system", "user", "user", "assistant"],
    ]
    assert rows[2]["messages"][0]["content"] == "be nice" and rows[0]["messages"][0]["content"] == "be a bot"
    assert rows[1]["messages"][2]["content"] != "hello"  # the original answers are replaced
    assert 0 < sum(bool(row.get("truncated")) for row in rows) < len(rows)  # some answers ended at <|im_end|>
    # Batched, left-padded greedy regeneration equals the target's own greedy decoding, turn by turn, with each
    # later turn conditioned on the regenerated (not the original) earlier answer.
    for row in rows:
        messages = [Message(m["role"], m["content"]) for m in row["messages"]]
        for index, message in enumerate(messages):
            if message.role == "assistant":
                assert message.content == greedy_answer(target, messages[:index], 6)


def test_targets_outside_the_lean_forward_regenerate_through_hf_generate(tmp_path, tiny_target_dir, monkeypatch):
    """Llama / Mistral / Qwen2 / Qwen3 targets answer through spectool's batched target loop, the others through
    HF generate (left-padded): both give the target's greedy answers, so the same rows."""
    from spectool.training import regen

    prompts = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    lean, hf = tmp_path / "lean.jsonl", tmp_path / "hf.jsonl"
    assert run_regen(tiny_target_dir, prompts, lean, "--batch-size", "3").exit_code == 0
    calls = []
    original = regen._Answerer._hf
    monkeypatch.setattr(regen, "fast_path_problem", lambda _target: "not covered")
    monkeypatch.setattr(regen._Answerer, "_hf", lambda self, *args: calls.append(1) or original(self, *args))
    assert run_regen(tiny_target_dir, prompts, hf, "--batch-size", "3").exit_code == 0
    assert calls and hf.read_text() == lean.read_text()


def test_regen_resumes_after_a_kill(tmp_path, tiny_target_dir):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    reference = tmp_path / "reference.jsonl"
    assert run_regen(tiny_target_dir, prompts, reference, "--batch-size", "1").exit_code == 0
    lines = reference.read_text().splitlines(keepends=True)
    killed = tmp_path / "killed.jsonl"
    killed.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])  # died while writing row 3
    # regen records its settings before the first row, so a killed run leaves the record beside its rows
    (tmp_path / "killed.jsonl.regen.json").write_text((tmp_path / "reference.jsonl.regen.json").read_text())
    assert read_finished_ids(killed)[1] is True  # the cut-off line is dropped...
    assert killed.read_text() == lines[0] + lines[1]  # ...and the file ends at the last complete row
    killed.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])
    result = run_regen(tiny_target_dir, prompts, killed, "--batch-size", "1")
    assert result.exit_code == 0, result.output
    assert "Regenerated 3 rows" in result.stdout and "2 of 5 rows were already there" in result.stdout
    assert "cut-off last line" in result.stdout
    assert killed.read_text() == reference.read_text()  # no duplicates, nothing missing, same order
    again = run_regen(tiny_target_dir, prompts, killed, "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["rows_written"] == 0


def test_regen_limit_and_seeded_sampling(tmp_path, tiny_target_dir):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    outs = [tmp_path / f"sampled{i}.jsonl" for i in range(3)]
    for out, seed in zip(outs, ("3", "3", "4"), strict=True):
        result = run_regen(tiny_target_dir, prompts, out, "--temperature", "1.5", "--seed", seed, "--limit", "2")
        assert result.exit_code == 0, result.output
    assert len(read_rows(outs[0])) == 2
    assert outs[0].read_text() == outs[1].read_text() != outs[2].read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (("--batch-size", "0"), "--batch-size must be at least 1"),
        (("--max-new-tokens", "0"), "--max-new-tokens must be at least 1"),
        (("--temperature", "-1"), "--temperature must be 0 (greedy) or positive"),
        (("--limit", "0"), "--limit must be at least 1"),
        (("--dtype", "int8"), "--dtype must be one of"),
        (("--chat-template", "missing.jinja"), "no such chat template file"),
    ],
)
def test_bad_options_exit_2(tmp_path, tiny_target_dir, args, message):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    result = run_regen(tiny_target_dir, prompts, tmp_path / "out.jsonl", *args)
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_prompts_file_exits_2(tmp_path, tiny_target_dir):
    result = run_regen(tiny_target_dir, tmp_path / "missing.jsonl", tmp_path / "out.jsonl")
    assert result.exit_code == 2 and "no such file or directory" in result.stderr


def test_malformed_rows_exit_1_unless_skipped(tmp_path, tiny_target_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(ROWS[0]) + "\n" + '{"messages": [{"role": "user"}]}\n')
    out = tmp_path / "out.jsonl"
    result = run_regen(tiny_target_dir, prompts, out)
    assert result.exit_code == 1 and f"{prompts}:2: messages[0] has no 'content'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
    skipped = run_regen(tiny_target_dir, prompts, out, "--skip-bad-rows")
    assert skipped.exit_code == 0 and "skipped 1 malformed rows" in skipped.stderr
    assert len(read_rows(out)) == 1


def test_foreign_output_file_is_refused(tmp_path, tiny_target_dir):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    out.write_text('{"text": "something else"}\n')
    result = run_regen(tiny_target_dir, prompts, out)
    assert result.exit_code == 1 and "not a regeneration row" in result.stderr


@pytest.mark.parametrize(
    "text",
    [
        "my notes about the project",  # one line, no newline: was truncated to nothing before the refusal
        '{"messages": [], "id": "a"}\nmy notes, no newline at the end',  # a regen-looking first line
        "first line of notes\nsecond line\n",
    ],
)
def test_regen_never_touches_a_file_it_did_not_write(tmp_path, tiny_target_dir, monkeypatch, text):
    """A file that is not a regeneration output is refused before the target loads, byte for byte unchanged."""
    import spectool.hub

    def no_load(*args, **kwargs):
        raise AssertionError("the target was loaded before --out was checked")

    monkeypatch.setattr(spectool.hub, "load_model_and_tokenizer", no_load)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    notes = tmp_path / "notes.txt"
    notes.write_text(text)
    result = run_regen(tiny_target_dir, prompts, notes)
    assert result.exit_code == 1, result.output
    assert "not a regeneration row" in result.stderr or "was not written by `spectool data regen`" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert notes.read_text() == text and not (tmp_path / "notes.txt.regen.json").exists()


def test_regen_keeps_prompt_and_answer_within_the_target_positions(tmp_path, tiny_target_dir):
    """Prompt + answer never exceed max_position_embeddings: answers are cut at the last position (marked
    truncated), rows whose prompt alone fills it are skipped with a warning, and a --max-new-tokens that leaves no
    room for any prompt is refused before the target loads."""
    import shutil

    small = tmp_path / "small-target"
    shutil.copytree(tiny_target_dir, small)
    config = json.loads((small / "config.json").read_text())
    config["max_position_embeddings"] = 24
    (small / "config.json").write_text(json.dumps(config))
    rows = [{"prompt": "hi"}, {"prompt": " ".join(["one two three"] * 10), "id": "long"}]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "out.jsonl"
    refused = run_regen(small, prompts, out, "--max-new-tokens", "24")
    assert refused.exit_code == 2 and "leaves no room for a prompt in the target's 24 positions" in refused.stderr
    result = run_regen(small, prompts, out, "--max-new-tokens", "20", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rows_too_long"] == 1 and summary["rows_written"] == 1 and summary["max_positions"] == 24
    (row,) = read_rows(out)
    assert row["id"] != "long"
    model, tokenizer = load_model_and_tokenizer(resolve_model(str(small)))
    chat_format = ChatFormat(tokenizer)
    messages = [Message(m["role"], m["content"]) for m in row["messages"]]
    prompt = chat_format.prompt_ids(messages[:-1])
    answer = tokenizer(messages[-1].content, add_special_tokens=False)["input_ids"]
    assert len(prompt) + len(answer) <= 24 and row.get("truncated") is True


def test_cut_at_stop():
    assert cut_at_stop([5, 6, 2, 7, 2], [2]) == ([5, 6], True)
    assert cut_at_stop([5, 6], [2, 3]) == ([5, 6], False)
    assert cut_at_stop([3], [2, 3]) == ([], True)


def test_resuming_with_other_settings_is_refused(tmp_path, tiny_target_dir):
    """Rows already in OUT count as done only when they were made with the same target, template and decoding."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    out = tmp_path / "regen.jsonl"
    assert run_regen(tiny_target_dir, prompts, out, "--limit", "2").exit_code == 0
    record = json.loads((tmp_path / "regen.jsonl.regen.json").read_text())
    assert record["target"] == str(tiny_target_dir) and record["temperature"] == 0.0
    before = out.read_text()
    result = run_regen(tiny_target_dir, prompts, out, "--temperature", "1.0")
    assert result.exit_code == 2, result.output
    assert "other settings: temperature 0.0 (now 1.0)" in result.stderr and out.read_text() == before
    result = run_regen(tiny_target_dir, prompts, out)  # the same settings: the remaining rows are appended
    assert result.exit_code == 0 and "2 of 5 rows were already there" in result.stdout


def test_max_turns_and_max_prompt_tokens(tmp_path, tiny_target_dir):
    """--max-turns ends a row after N answers; --max-prompt-tokens skips a row whose prompt is longer; both are
    settings of the output (resuming with others is refused)."""
    rows = [ROWS[1], {"prompt": " ".join(["one two three"] * 10), "id": "long"}]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "out.jsonl"
    result = run_regen(tiny_target_dir, prompts, out, "--max-turns", "1", "--max-prompt-tokens", "20", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rows_written"] == 1 and summary["rows_too_long"] == 1 and summary["assistant_turns"] == 1
    (row,) = read_rows(out)
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    again = run_regen(tiny_target_dir, prompts, out, "--max-turns", "2", "--max-prompt-tokens", "20")
    assert again.exit_code == 2 and "max_turns 1 (now 2)" in again.stderr
    bad = run_regen(tiny_target_dir, prompts, tmp_path / "x.jsonl", "--max-prompt-tokens", "0")
    assert bad.exit_code == 2 and "--max-prompt-tokens must be at least 1" in bad.stderr


def test_rows_are_batched_by_length_within_windows():
    from spectool.conversations import Conversation
    from spectool.training.regen import _length_sorted

    rows = [Conversation([Message("user", "x" * n)], "f", i, id=str(i)) for i, n in enumerate([5, 1, 9, 3, 7, 2])]
    assert [c.id for c in _length_sorted(rows, 3)] == ["1", "0", "2", "5", "3", "4"]
