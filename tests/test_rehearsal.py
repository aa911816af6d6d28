"""Real-size rehearsal (slow): CLI commands on a random-weight Qwen3-0.6B-shaped target (28 layers, 1024 wide,
151,936-row tied vocabulary, bf16 safetensors) built on the spot; see examples/rehearsal.py.

The quick set, to stay within a few minutes on 2 CPU cores: inspect, layers, init of every method the target
supports, data features, train 2 steps from the features (one process), bench 1 prompt x 8 tokens (lossless
against the target) and convert to vLLM, all with EAGLE-3. The full rehearsal (both targets, every method
trained online and benched, torchrun --fsdp) is `python examples/rehearsal.py --out DIR`.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_rehearsal():
    spec = importlib.util.spec_from_file_location("rehearsal", ROOT / "examples" / "rehearsal.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # @dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_command_runs_on_a_real_size_qwen3(tmp_path):
    rehearsal = load_rehearsal()
    steps = rehearsal.rehearse(tmp_path, ["qwen3-0.6b"], quick=True, fsdp=False, timeout=400, log=lambda _: None)
    names = [step.name for step in steps]
    expected = ["inspect", "layers", *(f"init {m}" for m in rehearsal.METHODS["qwen3-0.6b"])]
    expected += ["data features (eagle3)", "train eagle3 --features", "bench eagle3", "convert eagle3 -> vllm"]
    assert names == expected
    failed = [f"{s.name}: {' '.join(s.args)}\n{s.stderr[-2000:]}" for s in steps if s.returncode != 0]
    assert not failed, "\n\n".join(failed)
    over = [f"{s.name}: peak {s.peak_gib:.2f} GiB > budget {s.budget_gib:.2f}" for s in steps if s.over_budget]
    assert not over, "\n".join(over) + "\n" + rehearsal.table(steps)
    bench = steps[names.index("bench eagle3")]
    report = json.loads(bench.stdout[bench.stdout.index("{") :])
    assert rehearsal.lossless(report), f"not lossless: {bench.stdout[-2000:]}"
    converted = tmp_path / "qwen3-0.6b" / "eagle3-vllm" / "config.json"
    assert json.loads(converted.read_text()).get("eagle_aux_hidden_state_layer_ids")
