"""`spectool init` / `spectool convert` through Typer's runner: formats, inspect agreement, errors."""

import json
import shutil

import pytest
import torch

from spectool.checkpoint import load_draft
from tests.cli.conftest import invoke

METHODS = ("eagle1", "eagle3", "dflash", "dspark")


@pytest.mark.parametrize("method", METHODS)
def test_init_matches_inspect(method, tiny_target_dir, tmp_path):
    out = tmp_path / method
    result = invoke("init", str(tiny_target_dir), "--method", method, "--out", str(out), "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert "model.safetensors" in result.stdout
    report = json.loads(invoke("inspect", str(tiny_target_dir), "--json", "-m", method).stdout)["methods"][method]
    model = load_draft(out).model
    frozen = set(model.frozen_parameter_names())
    trainable = sum(p.numel() for n, p in model.named_parameters() if n not in frozen)
    assert trainable == report["trainable_params"]
    assert sum(p.numel() for n, p in model.named_parameters() if n in frozen) == report["frozen_params"]
    assert list(getattr(model.config, "target_layer_ids", None) or [7]) == report["target_layer_ids"]
    stored = {m["name"]: m["shape"] for m in report["modules"] if m["role"] != "borrowed"}
    assert {k: list(v.shape) for k, v in model.state_dict().items() if k in stored} == stored


def test_init_options_shape_the_draft(tiny_target_dir, tmp_path):
    out = tmp_path / "d"
    args = ["init", str(tiny_target_dir), "-m", "dflash", "-o", str(out), "--num-draft-layers", "1"]
    args += ["--block-size", "4", "--target-layer-ids", "0,3,6", "--mask-token-id", "252", "--seed", "3"]
    assert invoke(*args).exit_code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    assert config["dflash_config"] == {"block_size": 4, "mask_token_id": 252, "target_layer_ids": [0, 3, 6]}
    assert config["torch_dtype"] == "bfloat16"
    assert load_draft(out).model.fc.weight.dtype == torch.bfloat16


def test_init_is_seeded(tiny_target_dir, tmp_path):
    for name in ("a", "b"):
        invoke("init", str(tiny_target_dir), "-m", "dflash", "-o", str(tmp_path / name), "--seed", "5")
    a, b = load_draft(tmp_path / "a").model.state_dict(), load_draft(tmp_path / "b").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_never_overwrites_without_force(tiny_target_dir, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = invoke("init", str(tiny_target_dir), "-m", "dflash", "-o", str(out))
    assert result.exit_code == 2 and "--force" in result.stderr
    assert (out / "precious.txt").read_text() == "keep me"
    forced = invoke("init", str(tiny_target_dir), "-m", "dflash", "-o", str(out), "--force")
    assert forced.exit_code == 2 and "--force replaces only what spectool wrote" in forced.stderr
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    (out / "precious.txt").unlink()
    assert invoke("init", str(tiny_target_dir), "-m", "dflash", "-o", str(out)).exit_code == 0
    # A draft spectool wrote is replaced with --force...
    assert invoke("init", str(tiny_target_dir), "-m", "dspark", "-o", str(out), "--force").exit_code == 0
    assert load_draft(out).method == "dspark"
    # ...a model without spectool.json is somebody else's, --force or not.
    (out / "spectool.json").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    forced = invoke("init", str(tiny_target_dir), "-m", "dflash", "-o", str(out), "--force")
    assert forced.exit_code == 2 and "no draft or run written by spectool" in forced.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["-m", "eagle3", "--target-layer-ids", "1,2"], 2, "exactly 3"),
        (["-m", "dflash", "--target-layer-ids", "1,x"], 2, "comma-separated integers"),
        (["-m", "dflash", "--mask-token-id", "999"], 2, "outside the target's embedding"),
        (["-m", "dspark", "--num-feature-layers", "9"], 2, "between 1 and 7"),
        (["-m", "medusa"], 2, ""),
    ],
)
def test_init_bad_usage(tiny_target_dir, tmp_path, args, code, message):
    result = invoke("init", str(tiny_target_dir), "-o", str(tmp_path / "x"), *args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_init_needs_a_mask_token_when_no_row_is_spare(tiny_target_dir, tmp_path):
    directory = tmp_path / "full"
    directory.mkdir()
    for name in ("config.json", "model.safetensors"):
        (directory / name).write_bytes((tiny_target_dir / name).read_bytes())
    result = invoke("init", str(directory), "-m", "dflash", "-o", str(tmp_path / "x"))
    assert result.exit_code == 2 and "--mask-token-id" in result.stderr


def test_init_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["Phi3ForCausalLM"], "num_hidden_layers": 8, "hidden_size": 64,
                    "num_attention_heads": 4, "vocab_size": 256, "intermediate_size": 128})
    )  # fmt: skip
    result = invoke("init", str(tmp_path), "-m", "dspark", "-o", str(tmp_path / "x"))
    assert result.exit_code == 1
    assert "supported: Qwen3ForCausalLM, Qwen3MoeForCausalLM, LlamaForCausalLM" in result.stderr


def test_convert_command(tiny_target_dir, tmp_path):
    src = tmp_path / "src"
    invoke("init", str(tiny_target_dir), "-m", "eagle3", "-o", str(src))
    result = invoke("convert", str(src), "--to", "vllm", "--out", str(tmp_path / "vllm"))
    assert result.exit_code == 0 and "every weight matched" in result.stdout
    bad = invoke("convert", str(src), "--to", "deepspec", "--out", str(tmp_path / "ds"))
    assert bad.exit_code == 2 and "no deepspec layout" in bad.stderr
    missing = invoke("convert", str(tmp_path / "nope"), "--to", "vllm", "--out", str(tmp_path / "y"))
    assert missing.exit_code == 2


def test_init_never_writes_over_its_own_model(tiny_target_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_target_dir, model)
    before = sorted(p.name for p in model.iterdir())
    for out in (model, tmp_path):  # OUT is MODEL, or contains it: writing OUT would delete it, --force or not
        result = invoke("init", str(model), "-m", "dflash", "-o", str(out), "--force")
        assert result.exit_code == 2 and "MODEL" in result.stderr, result.output
    assert sorted(p.name for p in model.iterdir()) == before


def test_convert_never_writes_over_its_source(tiny_target_dir, tmp_path):
    src = tmp_path / "src"
    assert invoke("init", str(tiny_target_dir), "-m", "eagle3", "-o", str(src)).exit_code == 0
    for out in (src, tmp_path):
        result = invoke("convert", str(src), "--to", "sglang", "--out", str(out), "--force")
        assert result.exit_code == 2 and "SRC" in result.stderr, result.output
    assert (src / "model.safetensors").is_file()


def test_init_refuses_an_out_that_is_a_file(tiny_target_dir, tmp_path):
    (tmp_path / "f").write_text("x")
    result = invoke("init", str(tiny_target_dir), "-m", "dflash", "-o", str(tmp_path / "f" / "d"))
    assert result.exit_code == 2 and "which is a file" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "dflash", "--block-size", "1"], "between 2 and 64"),
        (["-m", "dspark", "--block-size", "65"], "between 2 and 64"),
        (["-m", "dspark", "--markov-rank", "0"], "--markov-rank must be at least 1"),
    ],
)
def test_init_out_of_range_options(tiny_target_dir, tmp_path, args, message):
    result = invoke("init", str(tiny_target_dir), "-o", str(tmp_path / "x"), *args)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert not (tmp_path / "x").exists()


def test_init_without_target_weights_says_what_to_do(tiny_model_dir, tmp_path):
    """EAGLE-3 copies the target's embedding: a config-only directory is refused in one line (DFlash needs none)."""
    result = invoke("init", str(tiny_model_dir), "-m", "eagle3", "-o", str(tmp_path / "e3"))
    assert result.exit_code == 2 and "weights are missing" in result.stderr and "--method dflash" in result.stderr
    assert "Traceback" not in result.output
    assert invoke("init", str(tiny_model_dir), "-m", "dflash", "-o", str(tmp_path / "df")).exit_code == 0


def test_init_eagle3_names_its_layers_for_sglang_and_vllm(tiny_target_dir, tmp_path):
    out = tmp_path / "e3"
    args = ["init", str(tiny_target_dir), "-m", "eagle3", "-o", str(out), "--target-layer-ids", "0,2,5"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 2, 5]  # SGLang adds 1 itself
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 3, 6]  # vLLM's own numbering
    assert "SGLang, vLLM" in result.stdout and "note:" not in result.stdout  # portable ids: no caveat


def test_init_says_which_engines_cannot_serve_the_last_layer(tiny_target_dir, tmp_path):
    result = invoke("init", str(tiny_target_dir), "-m", "dspark", "-o", str(tmp_path / "ds"))  # ids [1, 2, 4, 6, 7]
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "note: layer id 7 (the post-final-norm hidden state): captured by spectool and DeepSpec only" in text
    assert "vLLM and SGLang capture the stream entering a decoder layer, before the final norm" in text
    assert "--target-layer-ids 1,2,4,5,6" in text
    assert "loads in spectool, DeepSpec (not vLLM or SGLang: they cannot capture layer [7])" in text
    portable = invoke(
        "init", str(tiny_target_dir), "-m", "dspark", "-o", str(tmp_path / "p"), "--target-layer-ids", "1,2,4,5,6"
    )
    assert portable.exit_code == 0 and "note:" not in portable.stdout


def test_init_tiny_records_the_embedded_target_by_name(tmp_path, monkeypatch):
    """`spectool init tiny`: the draft names its target `tiny`, which resolves wherever spectool is installed."""
    monkeypatch.chdir(tmp_path)
    result = invoke("init", "tiny", "--method", "eagle3", "--out", "draft")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "draft" / "spectool.json").read_text())["target"] == "tiny"
    chat = invoke("chat", "--draft", "draft", "--prompt", "hi", "-n", "4")
    assert chat.exit_code == 0, chat.output


def test_a_catalog_target_without_weights_is_refused_before_torch_with_the_next_step(tmp_path):
    """Offline, a target known only from the catalog: init needs its embedding / lm_head and says how to get them,
    at once (it used to build an 8B-sized draft first, 38-45 s)."""
    import os
    import subprocess
    import sys

    code = (
        "import sys\nfrom spectool.cli import app\n"
        "try:\n    app(sys.argv[1:], prog_name='spectool')\nexcept SystemExit as exit:\n"
        "    print('torch' in sys.modules, exit.code)\n"
    )
    args = ["init", "Qwen/Qwen3-8B", "-m", "eagle3", "--out", str(tmp_path / "q")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "NO_COLOR": "1", "COLUMNS": "300"}
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env=env)
    assert result.stdout.split() == ["False", "1"], result.stderr
    assert "the weights are needed" in result.stderr and "run `hf download Qwen/Qwen3-8B`" in result.stderr
    assert not (tmp_path / "q").exists()
