"""`spectool report` (terminal summary, figure + CSV), `spectool train`'s plain progress lines and --report-to
checks, on a tiny chat target."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from spectool.bench import BenchReport
from tests.cli.conftest import invoke

FAST = ["--max-length", "48", "--batch-size", "2", "--num-anchors", "4", "--eval-fraction", "0.25"]


def train_args(target: Path, data: Path, out: Path) -> list[str]:
    return ["train", "--target", str(target), "--method", "dflash", "--data", str(data), "--out", str(out), *FAST]


def bench_json(path: Path, tps: float) -> Path:
    report = BenchReport(
        method="dflash",
        verify="auto",
        target="tiny",
        draft="run",
        num_prompts=2,
        max_new_tokens=8,
        temperature=0.0,
        lossless=True,
        mismatched_prompts=[],
        acceptance_length=2.5,
        tokens_per_second=tps,
        new_tokens=16,
        baselines={"target": {"tokens_per_second": 50.0, "speedup": tps / 50.0}},
        acceptance_histogram={1: 2, 3: 4},
        accepted_per_position=[0.8, 0.5],
    )
    path.write_text(json.dumps(report.to_json()))
    return path


def test_bad_report_to_is_a_usage_error_before_loading(tmp_path):
    result = invoke("train", "--target", str(tmp_path / "absent"), "--method", "dflash", "--data", "x.jsonl",
                    "--out", str(tmp_path / "run"), "--report-to", "foo")  # fmt: skip
    assert result.exit_code == 2 and "--report-to" in result.stderr and "foo" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_train_prints_plain_lines_then_report_draws_runs_and_a_bench(chat_target_dir, data_file, tmp_path):
    run = tmp_path / "run a"
    result = invoke(*train_args(chat_target_dir, data_file, run), "--max-steps", "3", "--log-every", "1",
                    "--eval-every", "2", "--report-to", "none")  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[[line.startswith("step ") for line in lines].index(True)].startswith("step 1/3 done")
    progress = [line for line in lines if line.startswith("step ") and " done (" not in line]
    assert [line.split()[1] for line in progress] == ["1/3", "2/3", "3/3"] and all("loss" in p for p in progress)
    assert f"spectool report '{run}'" in result.stdout  # quoted: the path holds a space
    # A second run (only its metrics) and a bench file.
    other = tmp_path / "run-b"
    other.mkdir()
    other_rows = [{"step": s, "loss": 3.0 / s, "acceptance_length": 1 + s / 10, "acc@1": 0.1 * s, "acc@2": 0.05 * s,
                   "tokens_per_second": 1000.0 + s} for s in (10, 20, 30)]  # fmt: skip
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in other_rows))
    bench = bench_json(tmp_path / "bench.json", 125.0)
    # A DSpark run written before every method logged the greedy acceptance length as acceptance_length.
    old = tmp_path / "old-dspark"
    old.mkdir()
    old_rows = [{"step": 5, "loss": 2.0, "acceptance_length": 3.5, "greedy_acceptance_length": 2.25,
                 "eval_acceptance_length": 3.0, "eval_greedy_acceptance_length": 2.5}]  # fmt: skip
    (old / "metrics.jsonl").write_text(json.dumps(old_rows[0]) + "\n")

    result = invoke("report", str(run), str(other), str(bench), str(old), "--out", str(tmp_path / "report.png"))
    assert result.exit_code == 0, result.output
    assert "run a" in result.stdout and "run-b" in result.stdout and "bench" in result.stdout
    assert "acceptance length" in result.stdout and any(c in result.stdout for c in "▁▂▃▄▅▆▇█")

    from matplotlib.image import imread

    image = imread(tmp_path / "report.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    with open(tmp_path / "report.csv", newline="") as handle:
        plotted = list(csv.DictReader(handle))
    got = {(r["source"], r["panel"], r["series"], r["x"]): float(r["value"]) for r in plotted}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in row for row in metrics)
    for name, rows in (("run a", metrics), ("run-b", other_rows)):
        for row in rows:
            step = str(row["step"])
            assert got[(name, "loss", "loss", step)] == pytest.approx(row["loss"])
            assert got[(name, "acceptance_length", "acceptance_length", step)] == pytest.approx(
                row["acceptance_length"]
            )
            assert got[(name, "tokens_per_second", "tokens_per_second", step)] == pytest.approx(
                row["tokens_per_second"]
            )
            shown = "prefix@1" if name == "run a" else "acc@1"  # run-b predates prefix@k: its acc@k is shown
            assert got[(name, "positions", shown, step)] == pytest.approx(row[shown])
            assert (name, "positions", "acc@1" if name == "run a" else "prefix@1", step) not in got
            if "eval_loss" in row:
                assert got[(name, "loss", "eval_loss", step)] == pytest.approx(row["eval_loss"])
    # Loss against training minutes: each row's mean step time times the steps since the row before.
    expected, minutes, previous = [], 0.0, 0
    for row in metrics:
        minutes += row["step_seconds"] * (row["step"] - previous) / 60
        previous = row["step"]
        expected.append((minutes, row["loss"]))
    by_time = [(float(r["x"]), float(r["value"])) for r in plotted
               if r["source"] == "run a" and r["panel"] == "loss_time" and r["series"] == "loss"]  # fmt: skip
    assert [x for x, _ in by_time] == pytest.approx([x for x, _ in expected])
    assert [v for _, v in by_time] == pytest.approx([v for _, v in expected])
    assert not any(r["source"] == "run-b" and r["panel"] == "loss_time" for r in plotted)  # no step_seconds
    assert "training minutes" in result.stdout
    assert got[("old-dspark", "acceptance_length", "acceptance_length", "5")] == 2.25  # read in today's names
    assert got[("old-dspark", "acceptance_length", "eval_acceptance_length", "5")] == 2.5
    assert got[("bench", "histogram", "rounds", "3")] == 4
    assert got[("bench", "decoders", "tokens_per_second", "speculative")] == 125.0
    assert got[("bench", "decoders", "tokens_per_second", "target")] == 50.0

    html = tmp_path / "report.html"
    result = invoke("report", str(bench), "--out", str(html))
    assert result.exit_code == 2 and "report.csv already exists; pass --force" in result.stderr  # the PNG's data
    result = invoke("report", str(bench), "--out", str(html), "--force")
    assert result.exit_code == 0, result.output
    assert "data:image/png;base64," in html.read_text() and (tmp_path / "report.csv").is_file()


def test_report_never_replaces_a_file_without_force(tmp_path):
    bench = bench_json(tmp_path / "bench.json", 100.0)
    figure, data = tmp_path / "mine.png", tmp_path / "mine.csv"
    figure.write_bytes(b"my own picture")
    data.write_text("my,own,numbers\n")
    result = invoke("report", str(bench), "--out", str(figure))
    assert result.exit_code == 2 and "mine.png and " in result.stderr and "pass --force" in result.stderr
    assert figure.read_bytes() == b"my own picture" and data.read_text() == "my,own,numbers\n"
    result = invoke("report", str(bench), "--out", str(figure), "--force")
    assert result.exit_code == 0, result.output
    assert figure.read_bytes().startswith(b"\x89PNG") and data.read_text() != "my,own,numbers\n"


def test_report_errors(tmp_path, monkeypatch):
    result = invoke("report", str(tmp_path / "absent"))
    assert result.exit_code == 2 and "does not exist" in result.stderr
    bench = bench_json(tmp_path / "bench.json", 100.0)
    result = invoke("report", str(bench), "--out", str(tmp_path / "report.svg"))
    assert result.exit_code == 2 and ".png or .html" in result.stderr
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    result = invoke("report", str(bench), "--out", str(tmp_path / "report.png"))
    assert result.exit_code == 2 and "pip install 'spectool[plot]'" in result.stderr


def test_bench_plot_writes_the_bench_figure(chat_target_dir, tmp_path):
    from spectool.draft_init import init_draft

    draft = init_draft(str(chat_target_dir), "dspark", tmp_path / "dspark", dtype="float32").path
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi there"}) + "\n" + json.dumps({"prompt": "what is the time"}) + "\n")
    figure = tmp_path / "bench.png"
    args = ["bench", "-d", str(draft), "-p", str(prompts), "-n", "6", "--baselines", "target", "--json"]
    result = invoke(*args, "--plot", str(figure))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # the JSON on stdout stays clean
    from matplotlib.image import imread

    assert imread(figure).ndim == 3
    with open(tmp_path / "bench.csv", newline="") as handle:
        got = {(r["panel"], r["series"], r["x"]): float(r["value"]) for r in csv.DictReader(handle)}
    assert got[("decoders", "tokens_per_second", "speculative")] == pytest.approx(data["tokens_per_second"])
    assert got[("decoders", "tokens_per_second", "target")] == pytest.approx(
        data["baselines"]["target"]["tokens_per_second"]
    )
    for k, count in data["acceptance_histogram"].items():
        assert got[("histogram", "rounds", k)] == count
    bad = invoke(*args, "--plot", str(tmp_path / "bench.svg"))
    assert bad.exit_code == 2 and ".png or .html" in bad.stderr


def test_a_bench_shares_the_colour_of_the_run_it_measured(tmp_path):
    from spectool.report import BenchSource, RunSource, _colours

    cycle = ["c0", "c1", "c2", "c3", "c4"]
    runs = [RunSource("eagle3", tmp_path / "eagle3"), RunSource("run-b", tmp_path / "run-b" / "metrics.jsonl")]
    for run in runs:
        (tmp_path / run.name).mkdir()
    benches = [
        BenchSource("bench-b", None, {"draft": str(tmp_path / "run-b")}),  # the run's own directory
        BenchSource("bench-shipped", None, {"draft": "spectool/assets/drafts/eagle3"}),  # named like a run
        BenchSource("bench-other", None, {"draft": "somewhere/else"}),
        BenchSource("bench-none", None, {}),
        BenchSource("bench-named-like-a-bench", None, {"draft": "elsewhere/bench-other"}),  # not a run's name
    ]
    colour = _colours(runs, benches, cycle)
    assert colour == {"eagle3": "c0", "run-b": "c1", "bench-b": "c1", "bench-shipped": "c0", "bench-other": "c2",
                      "bench-none": "c3", "bench-named-like-a-bench": "c4"}  # fmt: skip


def test_acceptance_sparklines_start_at_one_so_a_small_change_reads_small():
    from spectool.report import sparkline

    taus = [1.058, 1.07, 1.091]
    assert sparkline(taus) == "▁▄█"  # min to max: a flat run looks like a climb
    assert sparkline(taus, floor=1.0) == "▅▆█"  # from 1 (nothing accepted): it reads as it is
