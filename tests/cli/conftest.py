"""Helpers for driving the command line: in process through Typer's runner, and as the installed script."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants
from typer.testing import CliRunner

from spectool import hub
from spectool.cli import app

TINY_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "num_hidden_layers": 8,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 300,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub._hub_unreachable.cache_clear()


@pytest.fixture
def tiny_model_dir(tmp_path) -> Path:
    directory = tmp_path / "tiny"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(TINY_QWEN3))
    tokenizer = {"model": {"vocab": {f"t{i}": i for i in range(280)}}, "added_tokens": [{"id": 280}, {"id": 281}]}
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    return directory


WORDS = "hi hello there how is it going fine thanks what the time now one two three four five six seven".split()


@pytest.fixture
def data_file(tmp_path) -> Path:
    """8 random two-turn conversations of single-token words (seeded), for `train` runs through the CLI."""
    rng = random.Random(0)
    lines = []
    for _ in range(8):
        question = " ".join(rng.choice(WORDS) for _ in range(4))
        answer = " ".join(rng.choice(WORDS) for _ in range(10))
        row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
        lines.append(json.dumps(row))
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def invoke(*args: str):
    """Run the Typer app in process; returns the click Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, list(args))


def run_script(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run the installed `spectool` console script with the Hub offline and an empty HF_HOME."""
    script = Path(sys.executable).parent / "spectool"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "NO_COLOR": "1",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([str(script), *args], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
