"""The Python API example runs against the shipped draft and target (and asserts its own losslessness)."""

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "decode.py"


def test_decode_example_runs():
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--max-new-tokens", "12"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "", "HOME": str(Path.home())},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("acceptance length") == 4  # the single answer, then each batched row
    assert "prefill" in result.stdout and ("correction" in result.stdout or "bonus" in result.stdout)
