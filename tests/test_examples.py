"""The Python API example runs against the shipped draft and target (and asserts its own losslessness)."""

import json
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "decode.py"
STARTUP_BENCH = EXAMPLE.parent / "startup_bench.py"


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


def test_startup_bench_runs_and_names_the_machine():
    result = subprocess.run(
        [sys.executable, str(STARTUP_BENCH), "--runs", "1", "--json"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["machine"] and "logical CPUs" in report["machine"]
    rows = {row["case"]: row for row in report["results"]}
    assert list(rows)[0] == "python -c pass" and rows["python -c pass"]["ratio_to_python"] == 1.0
    assert {row["goal_s"] for row in report["results"]} == {None, 1.0, 2.0}
    for row in report["results"]:
        assert 0 < row["min_s"] <= row["median_s"] <= row["max_s"] and row["ratio_to_python"] > 0
