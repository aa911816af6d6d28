"""`spectool layers` through Typer's runner and the installed console script."""

import json

from tests.cli.conftest import invoke, run_script


def test_json_default_method_is_dspark():
    data = json.loads(invoke("layers", "-n", "36", "--json").stdout)
    assert data == {
        "num_target_layers": 36,
        "num_feature_layers": 5,
        "layers": {"dspark": [1, 10, 18, 26, 35]},
        "serving": {
            "dspark": {
                "engine_ids": [2, 11, 19, 27, 36],
                "served_by": ["spectool", "DeepSpec"],
                "not_served_by": ["vLLM", "SGLang"],
                "portable_ids": [1, 10, 18, 26, 34],
            }
        },
    }


def test_rich_view_says_which_engines_serve_the_last_layer():
    text = " ".join(invoke("layers", "-n", "36", "-m", "all").stdout.split())
    assert (
        "note: DSpark: layer id 35 (the post-final-norm hidden state): captured by spectool and DeepSpec only; vLLM "
        "and SGLang capture the stream entering a decoder layer, before the final norm, so they reach id 34 at most; "
        "nearest portable choice: --target-layer-ids 1,10,18,26,34"
    ) in text
    assert "note: DFlash" not in text and "note: EAGLE-3" not in text  # their defaults are portable
    assert "(vLLM and spectool can)" not in text
    portable = invoke("layers", "-n", "36", "-k", "1", "-m", "dflash").stdout
    assert "note:" not in portable


def test_all_methods_side_by_side():
    data = json.loads(invoke("layers", "-n", "32", "-m", "all", "--json").stdout)
    assert data["layers"] == {"dspark": [1, 8, 16, 24, 31], "dflash": [1, 8, 15, 22, 29], "eagle3": [1, 15, 28]}


def test_reads_depth_from_a_model(tiny_model_dir):
    data = json.loads(invoke("layers", str(tiny_model_dir), "-k", "3", "-m", "dflash", "--json").stdout)
    assert data["num_target_layers"] == 8 and data["layers"] == {"dflash": [1, 3, 5]}
    data = json.loads(invoke("layers", "Qwen/Qwen3-0.6B", "--json").stdout)  # offline: the catalog answers
    assert data["layers"]["dspark"] == [1, 8, 14, 20, 27]


def test_rich_view_has_depth_bars():
    result = invoke("layers", "-n", "8", "-m", "all")
    assert result.exit_code == 0
    assert "E▕░██░█░██▏" in result.stdout  # DSpark [1, 2, 4, 6, 7] on 8 layers
    assert "engine ids [2, 3, 5, 7, 8]" in result.stdout


def test_a_method_that_cannot_serve_the_depth_is_shown_in_all_mode():
    result = invoke("layers", "-n", "6", "-m", "all", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["layers"]["eagle3"] is None
    alone = invoke("layers", "-n", "6", "-m", "eagle3")
    assert alone.exit_code == 2 and "at least 7" in alone.stderr


def test_bad_usage_exit_2(tiny_model_dir):
    for args in (
        ("layers", "-n", "36", "-k", "0"),
        ("layers", "-n", "36", "-k", "36"),
        ("layers", "-n", "0"),
        ("layers", str(tiny_model_dir), "-n", "8"),
        ("layers", "-n", "36", "-m", "eagle1"),
    ):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output


def test_installed_console_script_and_module(tmp_path):
    result = run_script("layers", "--num-feature-layers", "5", "-n", "36", "--json", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["layers"]["dspark"] == [1, 10, 18, 26, 35]
    bad = run_script("layers", "-n", "36", "-k", "99", tmp_path=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --num-feature-layers must be between 1 and 35")
