"""`spectool train` and `spectool data features` through Typer's runner on a tiny chat target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spectool.checkpoint import load_draft
from tests.cli.conftest import invoke

FAST = ["--max-length", "48", "--batch-size", "2", "--num-anchors", "4", "--eval-fraction", "0", "--log-every", "1"]


def train(target: Path, data: Path, out: Path, *extra: str):
    args = ["train", "--target", str(target), "--method", "dflash", "--data", str(data), "--out", str(out)]
    return invoke(*args, *FAST, *extra)


def saved_config(out: Path) -> dict:
    return json.loads((out / "train_config.json").read_text())


def test_train_writes_a_draft_that_chat_loads(chat_target_dir, data_file, tmp_path):
    out = tmp_path / "run"
    result = train(chat_target_dir, data_file, out, "--max-steps", "2", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2 and summary["tokens"] > 0 and summary["metrics"]["loss"] > 0
    loaded = load_draft(out)
    assert loaded.method == "dflash" and loaded.metadata.training["steps"] == 2
    assert loaded.metadata.target == str(chat_target_dir.resolve())
    runtime = pytest.importorskip("spectool.runtime")
    rt = runtime.load_runtime(out)
    assert rt.info.ref == str(chat_target_dir.resolve()) and rt.draft.method == "dflash"


def test_a_draft_over_a_large_vocabulary_is_pointed_at_data_vocab(chat_target_dir, data_file, tmp_path):
    from spectool.cli.train_cmd import VOCAB_HINT_TOKENS, vocab_hint

    out = tmp_path / "run"
    result = train(chat_target_dir, data_file, out, "--max-steps", "1")
    assert result.exit_code == 0, result.output
    assert "data vocab" not in result.output  # the tiny target's vocabulary is small: no note
    metadata = out / "spectool.json"
    for method, vocab, expected in [("dflash", VOCAB_HINT_TOKENS, True), ("dspark", 151936, True),
                                    ("eagle1", 49152, True), ("dflash", VOCAB_HINT_TOKENS - 1, False),
                                    ("eagle3", 151936, False)]:  # fmt: skip
        metadata.write_text(json.dumps({"method": method, "target_vocab_size": vocab}))
        hint = vocab_hint(out)
        assert (hint is not None and f"spectool data vocab --draft {out} --size 8192" in hint) is expected, hint
    metadata.write_text("{not json")
    assert vocab_hint(out) is None


def test_config_file_values_yield_to_command_line_options(chat_target_dir, data_file, tmp_path):
    config = tmp_path / "train.toml"
    config.write_text('max_steps = 3\nbatch_size = 4\nlr = 0.01\nsave-every = 0\nassistant_turns = "last"\n')
    out = tmp_path / "run"
    result = train(chat_target_dir, data_file, out, "--config", str(config), "--max-steps", "1")
    assert result.exit_code == 0, result.output
    saved = saved_config(out)
    # --batch-size 2 (in FAST) beats the file's 4; --max-steps 1 beats 3; the rest comes from the file.
    assert (saved["max_steps"], saved["batch_size"], saved["lr"]) == (1, 2, 0.01)
    assert saved["save_every"] == 0 and saved["assistant_turns"] == "last"
    assert not (out / "checkpoints").exists()


def test_yaml_config_and_unknown_keys(chat_target_dir, data_file, tmp_path):
    pytest.importorskip("yaml")
    config = tmp_path / "train.yaml"
    config.write_text(
        f"target: {chat_target_dir}\nmethod: dflash\ndata: {data_file}\nmax_steps: 1\nnum_anchors: 4\n"
        "batch_size: 2\nmax_length: 48\neval_fraction: 0\n"
    )
    result = invoke("train", "--config", str(config), "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert saved_config(tmp_path / "run")["method"] == "dflash"

    bad = tmp_path / "bad.toml"
    bad.write_text("learning_rate = 0.1\nmax_steps = 'ten'\n")
    result = invoke("train", "--config", str(bad), "--out", str(tmp_path / "other"))
    assert result.exit_code == 2
    assert "unknown keys learning_rate" in result.stderr and "Traceback" not in result.output


def test_a_non_empty_out_needs_resume_or_force(chat_target_dir, data_file, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = train(chat_target_dir, data_file, out, "--max-steps", "1")
    assert result.exit_code == 2 and "--resume" in result.stderr and "--force" in result.stderr
    assert (out / "notes.txt").exists()
    result = train(chat_target_dir, data_file, out, "--max-steps", "1", "--force")
    assert result.exit_code == 2 and "--force replaces only what spectool wrote" in result.stderr
    assert "notes.txt" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing removed, nothing written


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_force_never_deletes_the_target(chat_target_dir, data_file, tmp_path):
    """`train --target proj/model --out proj --force` deleted the target model; now it is refused, untouched."""
    import shutil

    project = tmp_path / "proj"
    shutil.copytree(chat_target_dir, project / "model")
    before = tree(project)
    for out in (project, project / "model"):
        result = invoke(
            "train", "--target", str(project / "model"), "--method", "dflash", "--data", str(data_file),
            "--out", str(out), "--force", "--max-steps", "1", *FAST,
        )  # fmt: skip
        assert result.exit_code == 2, result.output
        assert "--target" in result.stderr and "choose another --out" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert tree(project) == before


def test_force_replaces_only_spectool_files_after_every_check(chat_target_dir, data_file, tmp_path):
    out = tmp_path / "run"
    assert train(chat_target_dir, data_file, out, "--max-steps", "2", "--save-every", "1").exit_code == 0
    first = tree(out)
    assert "checkpoints/step-0000002/trainer_state.pt" in first and "metrics.jsonl" in first
    # A malformed data file: the check fails, and the old run (checkpoints, metrics, draft) is all still there.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user"}]}\n')
    result = train(chat_target_dir, bad, out, "--max-steps", "1", "--force")
    assert result.exit_code != 0 and len(result.stderr.strip().splitlines()) == 1
    assert tree(out) == first
    # A bad option found only once the target is known: still nothing removed.
    result = train(chat_target_dir, data_file, out, "--max-steps", "1", "--force", "--target-layer-ids", "0,99")
    assert result.exit_code == 2 and tree(out) == first
    # The user's file beside a run: --force refuses rather than choose for them.
    (out / "notes.txt").write_text("mine")
    result = train(chat_target_dir, data_file, out, "--max-steps", "1", "--force")
    assert result.exit_code == 2 and "files spectool did not write (notes.txt)" in result.stderr
    (out / "notes.txt").unlink()
    # A good run replaces the old one: no stale checkpoints, metrics start over.
    result = train(chat_target_dir, data_file, out, "--max-steps", "1", "--force")
    assert result.exit_code == 0, result.output
    files = tree(out)
    assert {name.split("/")[1] for name in files if name.startswith("checkpoints/")} == {"step-0000001"}
    assert [json.loads(line)["step"] for line in files["metrics.jsonl"].decode().splitlines()] == [1]
    assert load_draft(out).metadata.training["steps"] == 1


def test_resume(chat_target_dir, data_file, tmp_path):
    out = tmp_path / "run"
    result = invoke("train", "--out", str(out), "--resume")
    assert result.exit_code == 2 and "nothing to resume" in result.stderr
    assert "leave out --resume to start a fresh run" in result.stderr and not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = invoke("train", "--out", str(out), "--resume")
    assert result.exit_code == 2 and "nothing to resume in" in result.stderr and "with --force" in result.stderr
    (out / "notes.txt").unlink()

    assert train(chat_target_dir, data_file, out, "--max-steps", "2", "--save-every", "1").exit_code == 0
    result = invoke("train", "--out", str(out), "--resume")
    assert result.exit_code == 2 and "already finished" in result.stderr
    result = invoke("train", "--out", str(out), "--resume", "--max-steps", "3", "--batch-size", "4")
    assert result.exit_code == 2 and "--batch-size 4 (saved 2)" in result.stderr
    result = invoke("train", "--out", str(out), "--resume", "--max-steps", "3")
    assert result.exit_code == 0, result.output
    assert "3 steps of 2 sequences (resuming after step 2)," in result.stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert load_draft(out).metadata.training["steps"] == 3


def test_method_options_are_the_methods_own(chat_target_dir, data_file, tmp_path):
    """A method's options reach its run (at the top level of train_config.json, another method's absent), are
    locked on resume, and are refused for a method that does not declare them; a train_config.json written before
    the options moved (every method's option listed, the others' as null) still resumes."""
    out = tmp_path / "run"
    assert (
        train(chat_target_dir, data_file, out, "--max-steps", "2", "--save-every", "1", "--gamma", "2.5").exit_code == 0
    )
    saved = saved_config(out)
    assert (saved["gamma"], saved["num_anchors"], saved["block_size"]) == (2.5, 4, 8)
    assert "markov_rank" not in saved and "ttt_steps" not in saved and "method_options" not in saved
    result = invoke("train", "--out", str(out), "--resume", "--max-steps", "3", "--num-anchors", "8")
    assert result.exit_code == 2 and "--num-anchors 8 (saved 4)" in result.stderr
    older = {**saved, "draft_vocab_size": None, "markov_rank": None, "ttt_steps": None, "ce_weight": None}
    (out / "train_config.json").write_text(json.dumps({**older, "l1_weight": None}))
    result = invoke("train", "--out", str(out), "--resume", "--max-steps", "3")
    assert result.exit_code == 0, result.output
    args = ["train", "--target", str(chat_target_dir), "--data", str(data_file), "--out", str(tmp_path / "x")]
    result = invoke(*args, "--method", "eagle3", "--gamma", "2")
    assert result.exit_code == 2 and "--gamma does not apply to EAGLE-3 drafts" in result.stderr
    result = invoke(*args, "--method", "dspark", "--ce-weight", "0", "--l1-weight", "0")
    assert result.exit_code == 2 and "--ce-weight and --l1-weight are both 0" in result.stderr
    config = tmp_path / "run.toml"
    config.write_text("method = 'dflash'\nmarkov_rank = 16\n")
    result = invoke(*args, "--config", str(config))
    assert result.exit_code == 2 and "--markov-rank does not apply to DFlash drafts" in result.stderr


def test_bad_rows_are_named_by_line(chat_target_dir, data_file, tmp_path):
    lines = data_file.read_text().splitlines()
    lines[2] = '{"messages": [{"role": "user", "content": "no answer here"}]}'
    data_file.write_text("\n".join(lines) + "\n")
    result = train(chat_target_dir, data_file, tmp_path / "new" / "run", "--max-steps", "1")
    assert result.exit_code == 1
    assert f"{data_file}:3: no assistant turn" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "new").exists()  # the failed run removes the empty directories it created
    result = train(chat_target_dir, data_file, tmp_path / "run2", "--max-steps", "1", "--skip-bad-rows")
    assert result.exit_code == 0, result.output
    assert "skipped 1 rows" in result.stdout and f"{data_file.name}:3" in result.stdout
    result = train(chat_target_dir, data_file, tmp_path / "run3", "--max-steps", "1", "--skip-bad-rows", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["steps"] == 1  # stdout: the JSON alone
    assert "skipped 1 rows" in result.stderr and f"{data_file.name}:3" in result.stderr


def test_features_then_train_from_them(chat_target_dir, data_file, tmp_path):
    features = tmp_path / "features"
    args = ["data", "features", "--target", str(chat_target_dir), "--method", "dflash", "--data", str(data_file)]
    args += ["--out", str(features), "--max-length", "48", "--shard-size", "3"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "8 examples in 3 shards" in result.stdout
    again = invoke(*args)
    assert again.exit_code == 0 and "3 were already there" in again.stdout
    out = tmp_path / "run"
    # --method comes from the features directory when left out.
    result = invoke("train", "--features", str(features), "--out", str(out), "--max-steps", "1", *FAST[2:])
    assert result.exit_code == 0, result.output
    assert "features" in result.stdout and saved_config(out)["target"] == str(chat_target_dir.resolve())
    assert load_draft(out).metadata.training["features"] == str(features)


def test_dspark_loss_weights(chat_target_dir, data_file, tmp_path):
    args = ["train", "--target", str(chat_target_dir), "--method", "dspark", "--data", str(data_file), *FAST]
    out = tmp_path / "run"
    result = invoke(*args, "--out", str(out), "--max-steps", "1", "--ce-weight", "1", "--l1-weight", "0")
    assert result.exit_code == 0, result.output
    assert (saved_config(out)["ce_weight"], saved_config(out)["l1_weight"]) == (1.0, 0.0)
    result = invoke(*args, "--out", str(tmp_path / "none"), "--ce-weight", "0", "--l1-weight", "0")
    assert result.exit_code == 2 and "both 0" in result.stderr
    result = invoke(*args, "--out", str(tmp_path / "negative"), "--ce-weight", "-1")
    assert result.exit_code == 2 and "--ce-weight" in result.stderr


def test_eagle3_trains_on_packed_rows(chat_target_dir, data_file, tmp_path):
    args = ["train", "--target", str(chat_target_dir), "--method", "eagle3", "--data", str(data_file)]
    options = ["--max-length", "64", "--batch-size", "2", "--eval-fraction", "0", "--ttt-steps", "2", "--pack"]
    result = invoke(*args, *options, "--out", str(tmp_path / "run"), "--max-steps", "2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 2 and saved_config(tmp_path / "run")["pack"] is True


def test_config_paths_are_read_from_the_config_folder_and_yaml_exponents_are_numbers(
    chat_target_dir, data_file, tmp_path, monkeypatch
):
    pytest.importorskip("yaml")
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "beside.jsonl").write_text(data_file.read_text())
    config = folder / "run.yaml"
    config.write_text(f"target: {chat_target_dir}\nmethod: dflash\ndata: beside.jsonl\nlr: 1e-3\nmax_steps: 1\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = invoke("train", "--config", str(config), "--out", "run", *FAST)
    assert result.exit_code == 0, result.output
    saved = saved_config(elsewhere / "run")  # --out stays relative to the current directory
    assert saved["data"] == str((folder / "beside.jsonl").resolve()) and saved["lr"] == 0.001


@pytest.mark.parametrize(
    "option",
    [("--lr", "inf"), ("--weight-decay", "nan"), ("--max-minutes", "inf"), ("--epochs", "inf"), ("--gamma", "nan")],
)
def test_non_finite_numbers_are_refused(chat_target_dir, data_file, tmp_path, option):
    result = train(chat_target_dir, data_file, tmp_path / "run", "--max-steps", "1", *option)
    assert result.exit_code == 2, result.output
    assert "must be a finite number" in result.stderr and option[0].lstrip("-").replace("-", "_") in result.stderr
    assert not (tmp_path / "run").exists()


def test_blocks_that_cannot_fit_are_refused(chat_target_dir, data_file, tmp_path):
    result = train(chat_target_dir, data_file, tmp_path / "a", "--max-steps", "1", "--block-size", "48")
    assert result.exit_code == 2 and "--block-size 48 leaves no room in --max-length 48" in result.stderr
    # A block may run past its conversation's end (cut, as the reference trainers do), but an anchor needs two
    # assistant tokens in a row: empty answers (<|im_end|> alone) leave every step with nothing to learn.
    empty = tmp_path / "empty.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": ""}]}] * 4
    empty.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = train(chat_target_dir, empty, tmp_path / "b", "--max-steps", "50", "--block-size", "40")
    assert result.exit_code == 1, result.output
    assert "had nothing to learn" in result.stderr and not (tmp_path / "b" / "model.safetensors").exists()
    assert "lr_scheduler" not in result.output


def test_bad_config_files_devices_and_tokenizers(chat_target_dir, data_file, tmp_path):
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00lr = 1")
    for config, message in ((binary, "not UTF-8"), (tmp_path, "is a directory")):
        result = invoke("train", "--config", str(config), "--out", str(tmp_path / "x"))
        assert result.exit_code == 2 and message in result.stderr, result.output
    result = train(chat_target_dir, data_file, tmp_path / "run", "--max-steps", "1", "--device", "foo")
    assert result.exit_code == 2 and "--device 'foo' is not a torch device" in result.stderr
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for item in chat_target_dir.iterdir():
        if not item.name.startswith("tokenizer"):
            (no_tokenizer / item.name).write_bytes(item.read_bytes())
    result = train(no_tokenizer, data_file, tmp_path / "run2", "--max-steps", "1")
    assert result.exit_code == 1 and f"no tokenizer in {no_tokenizer}" in result.stderr, result.output


@pytest.mark.parametrize("where", ["proc", "under-file", "is-file"])
def test_an_unwritable_out_is_one_line_before_the_target_loads(
    chat_target_dir, data_file, tmp_path, where, monkeypatch
):
    import spectool.hub

    def no_load(*args, **kwargs):
        raise AssertionError("the target was loaded before --out was checked")

    monkeypatch.setattr(spectool.hub, "load_model_and_tokenizer", no_load)
    (tmp_path / "file.txt").write_text("x")
    out = {
        "proc": Path("/proc/spectool-run"),
        "under-file": tmp_path / "file.txt" / "sub",
        "is-file": tmp_path / "file.txt",
    }[where]
    result = train(chat_target_dir, data_file, out, "--max-steps", "1")
    assert result.exit_code in (1, 2), result.output
    assert str(out) in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "internal error" not in result.stderr and (tmp_path / "file.txt").read_text() == "x"


def test_max_length_beyond_the_target_positions_is_capped_with_a_note(chat_target_dir, data_file, tmp_path):
    import shutil

    small = tmp_path / "small"
    shutil.copytree(chat_target_dir, small)
    config = json.loads((small / "config.json").read_text())
    config["max_position_embeddings"] = 32
    (small / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    result = train(small, data_file, out, "--max-steps", "1")  # FAST asks for --max-length 48
    assert result.exit_code == 0, result.output
    assert "--max-length 48 is more than the target's 32 positions" in " ".join(result.output.split())
    assert saved_config(out)["max_length"] == 32


def test_a_piped_run_says_within_one_step_that_it_trains_and_why_defaults_are_slow(
    chat_target_dir, data_file, tmp_path
):
    args = ["train", "--target", str(chat_target_dir), "--method", "dspark", "--data", str(data_file)]
    fast = [a for a in FAST if a not in ("--num-anchors", "4")]  # the method's default anchors
    result = invoke(*args, "--out", str(tmp_path / "run"), *fast, "--log-every", "5", "--max-steps", "3")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("step 1/3 done (then a line every 5 steps)"))
    assert first < next(i for i, line in enumerate(lines) if line.startswith("step 3/3 "))
    assert "dspark draws up to 512 blocks per row" in result.output and "--num-anchors 8" in result.output
    quiet = invoke(*args, "--out", str(tmp_path / "run8"), *FAST, "--max-steps", "1")
    assert "blocks per row" not in quiet.output  # --num-anchors given: no note
