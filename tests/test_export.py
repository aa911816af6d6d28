"""`spectool export`: the engines' launch flags, the speculative-token choice from measured acceptance, refusals of
what an engine cannot serve, and the vLLM copy that names its layers as vLLM reads them."""

import json
import shlex

import pytest

from spectool.errors import UsageError
from spectool.export import check_servable, choose_tokens, launch_command, reach_from_tau
from spectool.paths import SHIPPED_DRAFTS_DIR
from tests.cli.conftest import invoke


def test_reach_from_tau_spreads_the_acceptance_length_evenly():
    reach = reach_from_tau(2.0, 4)  # 1 + r + r^2 + r^3 + r^4 = 2 -> r = 0.5188
    assert reach[0] == pytest.approx(0.5188, abs=1e-4) and reach[1] == pytest.approx(0.5188**2, abs=1e-4)
    assert 1 + sum(reach) == pytest.approx(2.0, abs=1e-9)
    assert reach_from_tau(1.0, 3) == [0.0, 0.0, 0.0]


def test_choose_tokens_keeps_the_positions_reached_in_a_quarter_of_rounds():
    k, why = choose_tokens([0.8, 0.6, 0.3, 0.2, 0.1], 8, "bench b.json")
    assert k == 3 and "bench b.json" in why and "0.80 0.60 0.30 0.20" in why
    assert choose_tokens([0.9] * 10, 8, "x")[0] == 8  # capped
    k, why = choose_tokens([0.1, 0.05], 8, "x")
    assert k == 1 and "will not speed the target up" in why


def test_launch_commands_carry_each_engines_flags():
    vllm = shlex.split(launch_command("vllm", "eagle3", "Qwen/Qwen3-8B", "/d/e 3", 4))
    assert vllm[:3] == ["vllm", "serve", "Qwen/Qwen3-8B"] and vllm[3] == "--speculative-config"
    assert json.loads(vllm[4]) == {"method": "eagle3", "model": "/d/e 3", "num_speculative_tokens": 4}
    assert json.loads(shlex.split(launch_command("vllm", "eagle1", "t", "d", 2))[4])["method"] == "eagle"
    sglang = shlex.split(launch_command("sglang", "eagle3", "Qwen/Qwen3-8B", "/d/e 3", 4))
    flags = dict(zip(sglang[3::2], sglang[4::2], strict=True))
    assert sglang[:3] == ["python", "-m", "sglang.launch_server"]
    assert flags == {
        "--model-path": "Qwen/Qwen3-8B",
        "--speculative-algorithm": "EAGLE3",
        "--speculative-draft-model-path": "/d/e 3",
        "--speculative-num-steps": "4",
        "--speculative-eagle-topk": "1",
        "--speculative-num-draft-tokens": "5",  # a chain: the drafted tokens and the root
    }


def test_what_an_engine_cannot_serve_is_refused_with_the_reason():
    with pytest.raises(UsageError, match="serves eagle1, eagle3, dflash drafts, not dspark"):
        check_servable("vllm", "dspark", [1, 2], 8)
    with pytest.raises(UsageError, match=r"layer id 7 \(the post-final-norm.*--target-layer-ids 1,3,6"):
        check_servable("sglang", "eagle3", [1, 3, 7], 8)
    check_servable("vllm", "eagle3", [1, 3, 6], 8)


def test_export_writes_a_vllm_copy_and_chooses_tokens_from_a_bench(tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"prompts": "mt-bench", "accepted_per_position": [0.7, 0.5, 0.35, 0.2, 0.1]}))
    out = tmp_path / "vllm-copy"
    result = invoke("export", "eagle3", "--engine", "vllm", "--out", str(out), "--bench", str(bench), "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["num_speculative_tokens"] == 3 and "bench bench.json (mt-bench)" in plan["why"]
    assert plan["notes"] == []  # the copy names its layers as vLLM reads them
    config = json.loads((out / "config.json").read_text())
    nested = config["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    assert config["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in nested]  # vLLM's numbering
    words = shlex.split(plan["command"])
    assert json.loads(words[4]) == {"method": "eagle3", "model": str(out.resolve()), "num_speculative_tokens": 3}
    assert words[2].endswith("tiny-qwen3")  # the embedded target, by its directory

    text = invoke("export", str(SHIPPED_DRAFTS_DIR / "eagle3"), "--engine", "vllm")  # served as it is
    assert text.exit_code == 0 and "one layer off; pass --out DIR" in " ".join(text.stdout.split())
    assert "speculative tokens per round (training" in " ".join(text.stdout.split())


def test_export_usage_errors():
    refused = invoke("export", "dspark", "--engine", "vllm")
    assert refused.exit_code == 2 and "not dspark" in refused.stderr
    assert invoke("export", "eagle3", "--engine", "tensorrt").exit_code == 2
    missing = invoke("export", "eagle3", "--engine", "vllm", "--bench", "/nonexistent.json")
    assert missing.exit_code == 2 and "/nonexistent.json" in missing.stderr


def test_a_dflash_block_is_served_whole_with_the_engines_note():
    sglang = shlex.split(launch_command("sglang", "dflash", "t", "d", 15, block=16))
    flags = dict(zip(sglang[3::2], sglang[4::2], strict=True))
    assert flags["--speculative-algorithm"] == "DFLASH" and flags["--speculative-num-draft-tokens"] == "16"
    assert "--speculative-num-steps" not in flags
    result = invoke("export", "dflash", "--engine", "vllm", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    config = json.loads(shlex.split(plan["command"])[4])
    assert config["method"] == "dflash" and config["num_speculative_tokens"] == 7  # the shipped block of 8
    assert any("vLLM from 0.19 / 0.20" in note for note in plan["notes"])


def test_the_speculators_command_passes_the_layers_the_converter_does_not_read(tmp_path):
    out = tmp_path / "vllm-copy"
    plan = json.loads(invoke("export", "eagle3", "--engine", "vllm", "--out", str(out), "--json").stdout)
    words = shlex.split(plan["convert_command"])
    assert words[:3] == ["speculators", "convert", str(out.resolve())]
    flags = dict(zip(words[3::2], words[4::2], strict=True))
    assert flags["--algorithm"] == "eagle3" and flags["--verifier"].endswith("tiny-qwen3")
    config = json.loads((out / "config.json").read_text())
    assert json.loads(flags["--algorithm-kwargs"]) == {"eagle_aux_hidden_state_layer_ids": config[
        "eagle_aux_hidden_state_layer_ids"]}  # fmt: skip
    dflash = json.loads(invoke("export", "dflash", "--engine", "vllm", "--json").stdout)
    assert "--algorithm dflash" in dflash["convert_command"] and "--algorithm-kwargs" not in dflash["convert_command"]
    sglang = json.loads(invoke("export", "eagle3", "--engine", "sglang", "--json").stdout)
    assert sglang["convert_command"] is None


@pytest.mark.slow
@pytest.mark.parametrize("method", ["eagle3", "dflash"])
def test_vllm_speculators_converts_the_export(method, tmp_path):
    """The real converter (`pip install --no-deps speculators==0.9.0 hs-connectors==0.9.0`, as `.ci/run` does) reads
    the vLLM export and keeps the draft's feature layers in vLLM's numbering."""
    import os
    import subprocess
    import sys

    try:
        import speculators  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("CI must install speculators (README's test command)")
        pytest.skip("pip install --no-deps speculators==0.9.0 hs-connectors==0.9.0")
    out = tmp_path / "vllm"
    plan = json.loads(invoke("export", method, "--engine", "vllm", "--out", str(out), "--json").stdout)
    words = shlex.split(plan["convert_command"])
    result = subprocess.run(
        [sys.executable, "-m", "speculators", *words[1:]], capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    converted = json.loads((tmp_path / "vllm-speculators" / "config.json").read_text())
    assert converted["speculators_model_type"] == method
    layers = converted.get("eagle_aux_hidden_state_layer_ids") or converted.get("aux_hidden_state_layer_ids")
    exported = json.loads((out / "config.json").read_text())
    if method == "eagle3":
        assert layers == exported["eagle_aux_hidden_state_layer_ids"]
    else:  # z-lab's ids + 1, the target's last layer left out (speculators captures it anyway)
        assert layers == [i + 1 for i in exported["dflash_config"]["target_layer_ids"]][: len(layers)]
