"""The Python API example runs against the shipped draft and target (and asserts its own losslessness)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "decode.py"
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


def test_ship_copies_the_draft_into_the_package_and_its_metrics_into_examples(tmp_path):
    import importlib.util

    import torch
    from safetensors.torch import load_file, save_file

    spec = importlib.util.spec_from_file_location("ship", EXAMPLE.parent / "drafts" / "ship.py")
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    repo = tmp_path / "repo"
    (repo / "spectool" / "assets" / "tiny-qwen3").mkdir(parents=True)
    (repo / "examples" / "drafts").mkdir(parents=True)
    run = tmp_path / "run"
    run.mkdir()
    metadata = {"target": str(repo / "spectool" / "assets" / "tiny-qwen3"),
                "training": {"data": str(repo / "examples" / "data" / "train.jsonl"), "features": None}}  # fmt: skip
    (run / "spectool.json").write_text(json.dumps(metadata))
    (run / "config.json").write_text("{}")
    save_file({"w": torch.ones(2, 3)}, run / "model.safetensors", {"format": "pt"})
    (run / "checkpoint-1").mkdir()
    metrics = '{"step": 1, "loss": 2.0}\n'

    with pytest.raises(SystemExit, match="metrics.jsonl"):  # without its metrics the run's record would be lost
        ship.ship(run, "eagle3", repo)
    assert not (repo / "spectool" / "assets" / "drafts" / "eagle3").exists()
    (run / "metrics.jsonl").write_text(metrics)
    destination = ship.ship(run, "eagle3", repo)
    assert destination == repo / "spectool" / "assets" / "drafts" / "eagle3"
    assert sorted(p.name for p in destination.iterdir()) == ["config.json", "model.safetensors", "spectool.json"]
    shipped = json.loads((destination / "spectool.json").read_text())
    assert shipped["target"] == "tiny" and shipped["training"]["data"] == "examples/data/train.jsonl"
    assert (repo / "examples" / "runs" / "eagle3" / "metrics.jsonl").read_text() == metrics
    assert (repo / "examples" / "drafts" / "eagle3" / "config.json").is_file()  # the link resolves
    assert load_file(destination / "model.safetensors")["w"].dtype == torch.bfloat16  # shipped in bfloat16

    metadata["target"] = "SmolLM2-135M-Instruct.Q4_1.gguf"  # a packaged GGUF keeps its file name
    (run / "spectool.json").write_text(json.dumps(metadata))
    shipped = json.loads((ship.ship(run, "smollm2-eagle3", repo) / "spectool.json").read_text())
    assert shipped["target"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    metadata["target"] = "/home/me/models/qwen3"  # found on one machine only: refused
    (run / "spectool.json").write_text(json.dumps(metadata))
    with pytest.raises(SystemExit, match="packaged GGUF"):
        ship.ship(run, "mine", repo)


def test_readme_images_exist_and_the_side_by_side_runs_read_in_todays_names():
    import re

    from spectool.report import RunSource, load_sources

    readme = (ROOT / "README.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert "examples/runs/side-by-side/report.png" in images
    assert all((ROOT / image).is_file() for image in images)
    folder = ROOT / "examples" / "runs" / "side-by-side"
    sources = load_sources([folder / name for name in ("eagle3", "dflash", "dspark")])
    assert all(isinstance(s, RunSource) and s.rows for s in sources)
    # The DSpark run predates the rename: its greedy acceptance length (logged as greedy_acceptance_length)
    # is read as acceptance_length, the name every method uses today.
    raw = json.loads((folder / "dspark" / "metrics.jsonl").read_text().splitlines()[-1])
    assert sources[2].last("acceptance_length") == pytest.approx(raw["greedy_acceptance_length"])
