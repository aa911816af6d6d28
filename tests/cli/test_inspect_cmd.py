"""`spectool inspect` through Typer's runner and the installed console script."""

import json

import pytest

from spectool import catalog
from spectool.arch import TargetArch
from spectool.registry import draft_layout, resolve
from tests.cli.conftest import TINY_QWEN3, invoke, run_script


def test_json_shape_for_catalogued_qwen3_8b():
    result = invoke("inspect", "Qwen/Qwen3-8B", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    target = data["target"]
    assert target["architectures"] == ["Qwen3ForCausalLM"] and target["source"] == "catalog"
    assert (target["num_hidden_layers"], target["hidden_size"], target["head_dim"]) == (36, 4096, 128)
    assert target["tokenizer_length"] == 151669
    assert set(data["methods"]) == {"eagle1", "eagle3", "dflash", "dspark"}
    dflash = data["methods"]["dflash"]
    assert dflash["supported"] and dflash["draft_class"] == "Qwen3DFlashDraftModel"
    assert dflash["target_layer_ids"] == [1, 9, 17, 25, 33] and dflash["mask_token_id"] == 151669
    assert data["methods"]["eagle3"]["target_layer_ids"] == [1, 17, 32]
    assert data["methods"]["dspark"]["target_layer_ids"] == [1, 10, 18, 26, 35]
    for report in data["methods"].values():
        assert report["reason"] is None and isinstance(report["trainable_params"], int)


def test_json_counts_equal_the_layout():
    data = json.loads(invoke("inspect", "Qwen/Qwen3-8B", "--json", "-m", "dspark").stdout)
    arch = TargetArch.from_config(catalog.lookup("Qwen/Qwen3-8B").config)
    layout = draft_layout(resolve("dspark", arch, tokenizer_length=151669), arch)
    assert data["methods"]["dspark"]["trainable_params"] == layout.trainable_params
    assert data["methods"]["dspark"]["frozen_params"] == 2 * 151936 * 4096  # embed_tokens + lm_head copies
    assert list(data["methods"]) == ["dspark"]


def test_options_reshape_the_draft(tiny_model_dir):
    result = invoke(
        "inspect",
        str(tiny_model_dir),
        "--json",
        "-m",
        "dflash",
        "-k",
        "3",
        "--num-draft-layers",
        "1",
        "--block-size",
        "4",
    )
    report = json.loads(result.stdout)["methods"]["dflash"]
    assert report["target_layer_ids"] == [1, 3, 5] and report["num_draft_layers"] == 1 and report["block_size"] == 4
    assert report["mask_token_id"] == 282  # first unused embedding row = len(tokenizer)
    assert sum(1 for m in report["modules"] if m["name"].startswith("layers.1.")) == 0


def test_rich_view_shows_layers_and_catalog_notice(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    result = invoke("inspect", "Qwen/Qwen3-8B")
    assert result.exit_code == 0
    out = result.stdout
    assert "built-in catalog" in out
    for text in ("Qwen3DFlashDraftModel", "LlamaEagle3DraftModel", "[1, 17, 32]", "midlayer.hidden_norm"):
        assert text in out


def test_unsupported_architecture_exits_1_with_supported_list(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY_QWEN3, "architectures": ["GPT2LMHeadModel"]}))
    result = invoke("inspect", str(path), "-m", "dflash")
    assert result.exit_code == 1
    assert "GPT2LMHeadModel is not supported by any draft method" in result.stderr
    assert "supported architectures: GptOssForCausalLM, LlamaForCausalLM, Phi3ForCausalLM" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["inspect", "layers"])
def test_an_architecture_no_method_supports_is_named_before_any_field_check(tmp_path, command):
    """A GPT-2 config lacks num_hidden_layers; the user hears that no method supports GPT-2, not which field is
    missing."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 12}))
    result = invoke(command, str(path))
    assert result.exit_code == 1, result.output
    (line,) = result.stderr.strip().splitlines()
    assert "GPT2LMHeadModel is not supported by any draft method (EAGLE-1/2, EAGLE-3, DFlash, DSpark)" in line
    assert "LlamaForCausalLM" in line and "Qwen3ForCausalLM" in line and "num_hidden_layers" not in line


def test_the_offline_catalog_covers_the_readme_families_and_lists_its_ids():
    from spectool import catalog

    families = {catalog.lookup(hub_id).config["architectures"][0] for hub_id in catalog.hub_ids()}
    assert families == {"Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "LlamaForCausalLM", "Phi3ForCausalLM",
                        "GptOssForCausalLM"}  # fmt: skip
    assert {"microsoft/phi-4", "microsoft/Phi-4-mini-instruct", "meta-llama/Llama-3.3-70B-Instruct"} <= set(
        catalog.hub_ids()
    )
    result = invoke("inspect", "microsoft/phi-4", "--json")  # offline: the catalog answers
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["target"]["num_hidden_layers"] == 40
    result = invoke("inspect", "someone/not-in-the-catalog")
    assert result.exit_code == 1 and "The catalog knows: Qwen/Qwen3-0.6B," in result.stderr
    assert "microsoft/phi-4" in result.stderr


def test_partially_supported_target_exits_0():
    result = invoke("inspect", "microsoft/Phi-4-mini-instruct", "--json")
    assert result.exit_code == 0
    methods = json.loads(result.stdout)["methods"]
    assert methods["eagle3"]["supported"] and not methods["dflash"]["supported"]
    assert "DFlash has no draft" in methods["dflash"]["reason"]


def test_bad_usage_exit_2(tmp_path, tiny_model_dir):
    for args in (
        ("inspect", str(tmp_path / "missing")),
        ("inspect", str(tiny_model_dir), "-k", "0"),
        ("inspect", str(tiny_model_dir), "-k", "9", "-m", "dspark"),
        ("inspect", str(tiny_model_dir), "--block-size", "1", "-m", "dflash"),
        ("inspect", str(tiny_model_dir), "-m", "medusa"),
    ):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output


def test_malformed_config_exit_1(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    result = invoke("inspect", str(tmp_path))
    assert result.exit_code == 1
    assert "config.json: not valid JSON" in result.stderr


def test_shallow_target_reports_eagle3_instead_of_failing(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY_QWEN3, "num_hidden_layers": 6}))
    result = invoke("inspect", str(tmp_path), "--json")
    assert result.exit_code == 0
    eagle3 = json.loads(result.stdout)["methods"]["eagle3"]
    assert not eagle3["supported"] and "at least 7" in eagle3["reason"]


def test_installed_console_script(tmp_path, tiny_model_dir):
    result = run_script("inspect", "Qwen/Qwen3-0.6B", "--json", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["target"]["source"] == "catalog" and data["methods"]["dflash"]["target_layer_ids"] == [1, 7, 13, 19, 25]
    missing = run_script("inspect", str(tmp_path / "nope"), tmp_path=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("error: no such file or directory")
    assert "Traceback" not in missing.stderr


def test_default_model_is_the_embedded_tiny_target(tmp_path):
    result = run_script("inspect", "--json", tmp_path=tmp_path)  # no MODEL, run from an unrelated directory
    assert result.returncode == 0, result.stderr
    target = json.loads(result.stdout)["target"]
    assert target["source"] == "local" and target["ref"] == "tiny"  # its short name, usable in every command
    assert (target["num_hidden_layers"], target["hidden_size"], target["vocab_size"]) == (8, 256, 4096)
    assert target["tokenizer_length"] == 4080
    layers = run_script("layers", "-m", "all", "--json", tmp_path=tmp_path)
    assert json.loads(layers.stdout)["layers"] == {
        "dspark": [1, 2, 4, 6, 7],
        "dflash": [1, 2, 3, 4, 5],
        "eagle3": [1, 3, 4],
    }


def test_start_up_does_not_import_torch():
    """`inspect` / `layers` answer in well under a second: the command line must not import torch to start."""
    import subprocess
    import sys

    code = "import sys, spectool.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["False", "False"], result.stderr


def test_dspark_default_ids_say_which_engines_serve_them():
    data = json.loads(invoke("inspect", "Qwen/Qwen3-8B", "--json", "-m", "all").stdout)["methods"]
    dspark = data["dspark"]
    assert dspark["serving"] == {
        "engine_ids": [2, 11, 19, 27, 36],
        "served_by": ["spectool", "DeepSpec"],
        "not_served_by": ["vLLM", "SGLang"],
        "portable_ids": [1, 10, 18, 26, 34],
    }
    (note,) = dspark["notes"]
    assert note.startswith("layer id 35 (the post-final-norm hidden state): captured by spectool and DeepSpec only;")
    assert "before the final norm, so they reach id 34 at most" in note
    assert note.endswith("nearest portable choice: --target-layer-ids 1,10,18,26,34")
    assert "vLLM and spectool serve it" not in json.dumps(data)  # the old, wrong claim
    assert data["dflash"]["serving"]["not_served_by"] == [] and not data["dflash"]["notes"]
    assert data["dflash"]["serving"]["served_by"] == ["spectool", "the z-lab dflash package", "vLLM", "SGLang"]
    assert data["eagle3"]["serving"]["engine_ids"] == [2, 18, 33]
