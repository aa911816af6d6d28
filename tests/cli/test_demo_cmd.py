"""`spectool demo` end to end on the embedded tiny target (minutes on 2 CPU cores: marked slow)."""

import os
import subprocess
import sys

import pytest

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
    assert (out / "model.safetensors").is_file() and (out / "spectool.json").is_file()
