"""Start-up benchmark: how long the command line takes to answer when it should not load torch.

Times whole processes, as a person meets them: `spectool --help`, a bad-usage error (a draft path that does not
exist, which `bench` used to answer only after importing torch and transformers) and `spectool inspect` of a local
config.json (the embedded tiny target's, so nothing is downloaded), each beside `python -c pass` in the same run.
The cases are interleaved run by run, so a machine that gets busier part-way slows them all alike; the ratio to
`python -c pass` is the figure that travels between machines, the absolute time the one a person feels.

    python examples/startup_bench.py                # 10 runs of each
    python examples/startup_bench.py --runs 3 --check   # exit 1 when a goal is missed

Goals (issue 19): --help and bad usage under 1 s; inspect of a local config under 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "spectool" / "assets" / "tiny-qwen3" / "config.json"


@dataclass
class Case:
    name: str
    args: list[str]
    expect_exit: int
    goal_seconds: float | None  # None: the baseline


def spectool_command() -> list[str]:
    """The `spectool` console script beside this Python (what a user runs), else `python -m spectool`."""
    script = Path(sys.executable).parent / "spectool"
    if script.is_file():
        return [str(script)]
    found = shutil.which("spectool")
    return [found] if found else [sys.executable, "-m", "spectool"]


def cases() -> list[Case]:
    spectool = spectool_command()
    return [
        Case("python -c pass", [sys.executable, "-c", "pass"], 0, None),
        Case("spectool --help", [*spectool, "--help"], 0, 1.0),
        Case("bad usage (bench --draft /nonexistent)", [*spectool, "bench", "--draft", "/nonexistent/draft"], 2, 1.0),
        Case("spectool inspect <local config.json>", [*spectool, "inspect", str(TINY_CONFIG)], 0, 2.0),
    ]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs, load average {load} (1/5/15 min), Python {platform.python_version()}"


def time_once(case: Case, env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(case.args, capture_output=True, text=True, env=env, timeout=600)
    seconds = time.perf_counter() - start
    if result.returncode != case.expect_exit:
        raise SystemExit(f"{case.name}: exit {result.returncode}, expected {case.expect_exit}\n{result.stderr[-1000:]}")
    return seconds


def measure(runs: int) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "100"}
    chosen = cases()
    times: dict[str, list[float]] = {case.name: [] for case in chosen}
    for case in chosen:  # one untimed run each: the page cache and .pyc files warm, as on a second use
        time_once(case, env)
    for _ in range(runs):
        for case in chosen:
            times[case.name].append(time_once(case, env))
    baseline = statistics.median(times[chosen[0].name])
    rows = []
    for case in chosen:
        median = statistics.median(times[case.name])
        rows.append(
            {
                "case": case.name,
                "median_s": round(median, 3),
                "min_s": round(min(times[case.name]), 3),
                "max_s": round(max(times[case.name]), 3),
                "ratio_to_python": round(median / baseline, 1),
                "goal_s": case.goal_seconds,
                "met": None if case.goal_seconds is None else median < case.goal_seconds,
            }
        )
    return rows


def render(rows: list[dict], runs: int, before: str, after: str) -> str:
    lines = [
        f"machine: {before}",
        f"after the runs: load average {after.rsplit('load average ', 1)[-1].split(' (')[0]}",
        f"{runs} timed runs of each command (plus one warm-up), interleaved; median, min-max",
        "",
        "| command | median | min-max | x python -c pass | goal |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        goal = "" if row["goal_s"] is None else f"< {row['goal_s']:g} s: {'met' if row['met'] else 'MISSED'}"
        lines.append(
            f"| {row['case']} | {row['median_s']:.2f} s | {row['min_s']:.2f}-{row['max_s']:.2f} s | "
            f"{row['ratio_to_python']:.1f} | {goal} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="timed runs of each command (default 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if not TINY_CONFIG.is_file():
        parser.error(f"the embedded tiny target is missing ({TINY_CONFIG}); run from a spectool checkout")
    before = machine()
    rows = measure(args.runs)
    after = machine()
    if args.json:
        print(json.dumps({"machine": before, "machine_after": after, "runs": args.runs, "results": rows}, indent=2))
    else:
        print(render(rows, args.runs, before, after))
    missed = [row["case"] for row in rows if row["met"] is False]
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
