"""Checkpoints: init writes the ecosystem formats, load validates them, convert re-saves, saves are atomic."""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from spectool import checkpoint
from spectool.checkpoint import DraftMetadata, check_against_target, convert, load_draft, save_draft
from spectool.draft_init import init_draft
from spectool.errors import SpectoolError, UsageError
from spectool.hub import read_target_weights, resolve_model
from tests.conftest import CHAT_TEMPLATE

METHODS = ("eagle1", "eagle3", "dflash", "dspark")


@pytest.fixture(scope="module")
def drafts(tiny_target_dir, tmp_path_factory):
    """One float32 draft of each method, initialised for the tiny target."""
    root = tmp_path_factory.mktemp("drafts")
    return {m: init_draft(str(tiny_target_dir), m, root / m, dtype="float32").path for m in METHODS}


def keys(path):
    with safe_open(path / "model.safetensors", framework="pt") as handle:
        return set(handle.keys())


def test_eagle3_always_writes_d2t_t2d_and_no_embeddings(drafts):
    names = keys(drafts["eagle3"])
    assert {"d2t", "t2d", "fc.weight", "norm.weight", "lm_head.weight"} <= names
    assert not any(n.startswith("embed_tokens") for n in names)
    tensors = load_file(drafts["eagle3"] / "model.safetensors")
    assert tensors["d2t"].dtype == torch.int64 and bool((tensors["d2t"] == 0).all())  # identity: no pruning
    assert tensors["t2d"].dtype == torch.bool and bool(tensors["t2d"].all())
    config = json.loads((drafts["eagle3"] / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [1, 3, 4], "use_aux_hidden_state": True}
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]  # vLLM reads only this key, in its numbering


def test_configs_carry_the_format_fields(drafts):
    dflash = json.loads((drafts["dflash"] / "config.json").read_text())
    assert dflash["architectures"] == ["DFlashDraftModel"] and dflash["model_type"] == "qwen3"
    assert dflash["dflash_config"] == {"block_size": 8, "mask_token_id": 250, "target_layer_ids": [1, 5]}
    dspark = json.loads((drafts["dspark"] / "config.json").read_text())
    assert dspark["architectures"] == ["Qwen3DSparkModel"]
    for key in ("block_size", "target_layer_ids", "num_target_layers", "mask_token_id", "num_anchors", "markov_rank"):
        assert key in dspark
    assert (dspark["block_size"], dspark["mask_token_id"], dspark["num_target_layers"]) == (7, 250, 8)


def test_metadata_finds_the_target_again(drafts, tiny_target_dir):
    meta = json.loads((drafts["dspark"] / "spectool.json").read_text())
    assert meta["target"] == str(tiny_target_dir.resolve())
    assert meta["method"] == "dspark" and meta["target_layer_ids"] == [1, 2, 4, 6, 7]
    assert meta["tokenizer_length"] == 250 and meta["num_target_layers"] == 8
    assert meta["chat_template_sha256"] == checkpoint.chat_template_sha256(CHAT_TEMPLATE)


def test_target_copies(drafts, tiny_target_dir):
    target = load_file(tiny_target_dir / "model.safetensors")
    embed, head = target["model.embed_tokens.weight"], target["lm_head.weight"]
    dspark = load_file(drafts["dspark"] / "model.safetensors")
    assert torch.equal(dspark["embed_tokens.weight"], embed) and torch.equal(dspark["lm_head.weight"], head)
    assert torch.equal(load_file(drafts["eagle1"] / "model.safetensors")["embed_tokens.weight"], embed)
    assert torch.equal(load_file(drafts["eagle3"] / "model.safetensors")["lm_head.weight"], head)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_is_bitwise(drafts, method, tmp_path):
    loaded = load_draft(drafts[method])
    assert loaded.method == method and not loaded.notes
    again = save_draft(loaded.model, tmp_path / "again", method=method, metadata=loaded.metadata)
    first, second = load_file(drafts[method] / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    reloaded = load_draft(again).model.state_dict()
    assert all(torch.equal(v, first[k]) for k, v in reloaded.items())


def test_frozen_copies_stay_frozen_after_load(drafts):
    model = load_draft(drafts["dspark"]).model
    assert not model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad
    assert model.fc.weight.requires_grad


def rewrite(src, dst, rename=lambda k: k, drop=(), add=None, config_change=None):
    shutil.copytree(src, dst)
    tensors = {rename(k): v for k, v in load_file(src / "model.safetensors").items() if k not in drop}
    tensors.update(add or {})
    save_file(tensors, str(dst / "model.safetensors"))
    if config_change:
        config = json.loads((dst / "config.json").read_text())
        config_change(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_missing_and_unexpected_weights_are_listed(drafts, tmp_path):
    broken = rewrite(drafts["dflash"], tmp_path / "a", drop=("hidden_norm.weight",), add={"extra.bias": torch.ones(2)})
    with pytest.raises(SpectoolError) as info:
        load_draft(broken)
    assert "missing 1: hidden_norm.weight" in str(info.value) and "unexpected 1: extra.bias" in str(info.value)


def test_wrong_shape_is_an_error(drafts, tmp_path):
    broken = rewrite(drafts["dflash"], tmp_path / "a", add={"norm.weight": torch.zeros(32)})
    with pytest.raises(SpectoolError, match=r"norm.weight \(32,\) != \(64,\)"):
        load_draft(broken)


@pytest.mark.parametrize("method", ["eagle3", "dflash", "dspark"])
def test_feature_layers_times_width_must_be_the_fc_input(drafts, tmp_path, method):
    fc = load_file(drafts[method] / "model.safetensors")["fc.weight"]
    broken = rewrite(drafts[method], tmp_path / "a", add={"fc.weight": torch.zeros(fc.shape[0], fc.shape[1] + 64)})
    with pytest.raises(SpectoolError, match=r"feature layers .* of width 64 .* fc.weight takes \d+ inputs") as info:
        load_draft(broken)
    assert "\n" not in str(info.value)


def test_nemo_style_dflash_export_loads(drafts, tmp_path):
    def rename_arch(config):
        config["architectures"] = ["Qwen3DFlashDraftModel"]

    nemo = rewrite(drafts["dflash"], tmp_path / "nemo", rename=lambda k: "model." + k, config_change=rename_arch)
    loaded = load_draft(nemo)
    assert loaded.method == "dflash" and "prefixes" in loaded.notes[0]
    original = load_draft(drafts["dflash"]).model.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in loaded.model.state_dict().items())


def test_nemo_style_eagle3_layers_0_loads(drafts, tmp_path):
    nemo = rewrite(drafts["eagle3"], tmp_path / "nemo", rename=lambda k: "model." + k.replace("midlayer.", "layers.0."))
    assert load_draft(nemo).method == "eagle3"


def test_specforge_embed_tokens_is_ignored_visibly(drafts, tmp_path):
    specforge = rewrite(drafts["eagle3"], tmp_path / "sf", add={"embed_tokens.weight": torch.zeros(256, 64)})
    assert "embed_tokens" in load_draft(specforge).notes[-1]


def test_unknown_architecture_and_missing_dir(tmp_path, drafts):
    odd = rewrite(
        drafts["dflash"],
        tmp_path / "odd",
        config_change=lambda c: c.update(architectures=["Foo"]) or c.pop("dflash_config"),
    )
    with pytest.raises(SpectoolError, match="not a draft format spectool knows"):
        load_draft(odd)
    with pytest.raises(UsageError, match="no such draft directory"):
        load_draft(tmp_path / "nothing")


def test_check_against_target(drafts, tiny_target_dir, tmp_path):
    info = resolve_model(str(tiny_target_dir))
    assert check_against_target(load_draft(drafts["dspark"]), info.arch, 250) == []
    shutil.copytree(tiny_target_dir, tmp_path / "other")
    config = json.loads((tmp_path / "other" / "config.json").read_text())
    config.update(num_hidden_layers=6, hidden_size=96, vocab_size=200, layer_types=config["layer_types"][:6])
    (tmp_path / "other" / "config.json").write_text(json.dumps(config))
    other = resolve_model(str(tmp_path / "other"))
    with pytest.raises(SpectoolError) as info_:
        check_against_target(load_draft(drafts["dspark"]), other.arch)
    message = str(info_.value)
    for part in ("width 64", "200", "made for a target with 8 layers", "[1, 2, 4, 6, 7]", "mask token 250"):
        assert part in message
    warnings = check_against_target(load_draft(drafts["dspark"]), info.arch, tokenizer_length=300)
    assert "tokenizer of length 250" in warnings[0]


def test_atomic_save_keeps_the_previous_checkpoint(drafts, tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    shutil.copytree(drafts["dflash"], target)
    before = (target / "model.safetensors").read_bytes()
    model = load_draft(target).model

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # a kill in the middle of writing the weights

    monkeypatch.setattr(checkpoint, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        save_draft(model, target, method="dflash")
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directory left behind
    load_draft(target)


def test_convert(drafts, tmp_path):
    out = tmp_path / "sglang"
    loaded = convert(drafts["eagle3"], "sglang", out)
    assert loaded.method == "eagle3" and keys(out) == keys(drafts["eagle3"])
    with pytest.raises(UsageError, match="no vllm layout"):
        convert(drafts["dspark"], "vllm", tmp_path / "x")
    with pytest.raises(UsageError, match="is the SRC"):
        convert(drafts["dflash"], "dflash", drafts["dflash"])
    with pytest.raises(UsageError, match="contains the SRC"):  # writing OUT would delete SRC inside it
        convert(drafts["dflash"], "dflash", drafts["dflash"].parent)
    with pytest.raises(UsageError, match="--to must be one of"):
        convert(drafts["dflash"], "onnx", tmp_path / "y")


def test_dflash_package_loads_init_output(drafts):
    dflash_model = pytest.importorskip("dflash.model")
    _, info = dflash_model.DFlashDraftModel.from_pretrained(drafts["dflash"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_read_target_weights_from_a_sharded_index(tiny_target_dir, tmp_path):
    directory = tmp_path / "sharded"
    shutil.copytree(tiny_target_dir, directory)
    tensors = load_file(directory / "model.safetensors")
    os.remove(directory / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"a.safetensors": names[:half], "b.safetensors": names[half:]}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, str(directory / shard))
    index = {"weight_map": {n: s for s, members in shards.items() for n in members}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    weights = read_target_weights(resolve_model(str(directory)))
    assert torch.equal(weights["embed_tokens"], tensors["model.embed_tokens.weight"])
    assert torch.equal(weights["lm_head"], tensors["lm_head.weight"])


def test_metadata_round_trip():
    meta = DraftMetadata(method="dflash", target="Qwen/Qwen3-8B", target_layer_ids=[1, 9])
    assert DraftMetadata.from_json({**meta.to_json(), "unknown_future_field": 1}) == meta


@pytest.mark.parametrize(
    ("method", "change", "field"),
    [
        ("dflash", {"hidden_size": 0}, "hidden_size"),
        ("dspark", {"num_attention_heads": "4"}, "num_attention_heads"),
        ("dspark", {"block_size": 1}, "block_size"),
        ("eagle3", {"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, "rope_theta"),
    ],
)
def test_invalid_config_values_are_one_line_errors(drafts, tmp_path, method, change, field):
    broken = rewrite(drafts[method], tmp_path / "bad", config_change=lambda c: c.update(change))
    with pytest.raises(SpectoolError, match=f"not a valid {method} draft config") as info:
        load_draft(broken)
    assert field in str(info.value) and "\n" not in str(info.value)


def test_save_refuses_an_output_that_is_a_file(drafts, tmp_path):
    model = load_draft(drafts["dflash"]).model
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UsageError, match="is a file"):
        save_draft(model, tmp_path / "file", method="dflash")
    with pytest.raises(UsageError, match="lies under .*file, which is a file"):
        save_draft(model, tmp_path / "file" / "draft", method="dflash")
    assert (tmp_path / "file").read_text() == "mine"


def test_articles_in_messages():
    assert checkpoint.with_article("eagle3") == "an eagle3"
    assert checkpoint.with_article("dspark") == "a dspark"


@pytest.mark.parametrize(
    ("target", "new", "expected"),
    [
        ("../../tiny", "assets/drafts/x", "../../tiny"),  # same depth: unchanged
        ("../../tiny", "elsewhere", "../assets/tiny"),
        ("./target", "assets/drafts/copy", "../x/target"),
        ("Qwen/Qwen3-8B", "elsewhere", "Qwen/Qwen3-8B"),  # Hub ids and absolute paths stay
        ("/abs/target", "elsewhere", "/abs/target"),
        (None, "elsewhere", None),
    ],
)
def test_relocated_target(tmp_path, target, new, expected):
    old = tmp_path / "assets" / "drafts" / "x"
    assert checkpoint.relocated_target(target, old, tmp_path / new) == expected


def test_convert_keeps_a_relative_target_reachable(drafts, tmp_path):
    src = tmp_path / "deep" / "src"
    shutil.copytree(drafts["eagle3"], src)
    meta = json.loads((src / "spectool.json").read_text())
    (tmp_path / "tgt").mkdir()
    meta["target"] = "../../tgt"
    (src / "spectool.json").write_text(json.dumps(meta))
    loaded = convert(src, "sglang", tmp_path / "out")
    assert loaded.metadata.target == "../tgt"
    assert ((tmp_path / "out") / loaded.metadata.target).resolve() == (tmp_path / "tgt").resolve()


def engine_readings(config):
    """Which target tensors each reader of an EAGLE-3 config.json captures, all in the numbering "input of decoder
    layer j" (HF hidden_states[j]): SGLang adds 1 to eagle_config's ids; vLLM takes its top-level ids as they are."""
    return {
        "sglang": [i + 1 for i in config["eagle_config"]["eagle_aux_hidden_state_layer_ids"]],
        "vllm": list(config["eagle_aux_hidden_state_layer_ids"]),
    }


def test_eagle3_layer_ids_survive_write_and_read_in_every_numbering(tiny_target_dir, tmp_path):
    ids = [0, 2, 5]  # not the default [1, 3, 4] of the 8-layer target
    path = init_draft(str(tiny_target_dir), "eagle3", tmp_path / "d", target_layer_ids=ids, dtype="float32").path
    config = json.loads((path / "config.json").read_text())
    assert engine_readings(config) == {"sglang": [1, 3, 6], "vllm": [1, 3, 6]}  # spectool id + 1 = hidden_states[i+1]
    assert load_draft(path).target_layer_ids == ids
    for to in ("vllm", "sglang"):
        converted = convert(path, to, tmp_path / to)
        assert converted.target_layer_ids == ids
        assert engine_readings(json.loads((tmp_path / to / "config.json").read_text()))["vllm"] == [1, 3, 6]
    again = save_draft(load_draft(path).model, tmp_path / "again", method="eagle3")
    assert engine_readings(json.loads((again / "config.json").read_text())) == {"sglang": [1, 3, 6], "vllm": [1, 3, 6]}


def test_eagle3_ids_of_a_vllm_only_config_are_read_in_vllm_numbering(drafts, tmp_path):
    def vllm_only(config):
        config["eagle_config"] = {"use_aux_hidden_state": True}
        config["eagle_aux_hidden_state_layer_ids"] = [1, 3, 6]

    loaded = load_draft(rewrite(drafts["eagle3"], tmp_path / "v", config_change=vllm_only))
    assert loaded.target_layer_ids == [0, 2, 5] and not loaded.notes


def test_eagle3_ids_that_disagree_between_engines_are_named(drafts, tmp_path):
    def disagree(config):  # a conversion that copied SGLang's ids into vLLM's key unchanged
        config["eagle_aux_hidden_state_layer_ids"] = list(config["eagle_config"]["eagle_aux_hidden_state_layer_ids"])

    loaded = load_draft(rewrite(drafts["eagle3"], tmp_path / "v", config_change=disagree))
    assert loaded.target_layer_ids == [1, 3, 4]  # eagle_config wins
    assert "SGLang and vLLM read different layers" in loaded.notes[-1]


def test_eagle3_without_known_ids_writes_none(drafts, tmp_path):
    def no_ids(config):
        config["eagle_config"] = {"use_aux_hidden_state": True}
        config.pop("eagle_aux_hidden_state_layer_ids", None)
        config.pop("num_target_layers", None)

    source = rewrite(drafts["eagle3"], tmp_path / "s", config_change=no_ids)
    (source / "spectool.json").unlink()
    loaded = convert(source, "sglang", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert not loaded.target_layer_ids  # the engines' defaults still apply: nothing invented, nothing empty written
    assert config["eagle_config"] == {"use_aux_hidden_state": True} and "eagle_aux_hidden_state_layer_ids" not in config


def test_dflash_without_layer_ids_uses_the_dflash_packages_default(drafts, tmp_path):
    def no_ids(config):  # the dflash package then derives them from num_target_layers and the draft depth
        config["dflash_config"].pop("target_layer_ids")

    loaded = load_draft(rewrite(drafts["dflash"], tmp_path / "d", config_change=no_ids))
    assert loaded.target_layer_ids == [1, 5]  # round(1 + i*(8-4)/(2-1)) for the 8-layer target, 2 draft layers
    dflash_model = pytest.importorskip("dflash.model")
    assert dflash_model.build_target_layer_ids(8, 2) == [1, 5]


def test_a_config_that_names_no_dspark_layers_is_a_one_line_error(drafts, tmp_path):
    broken = rewrite(drafts["dspark"], tmp_path / "d", config_change=lambda c: c.pop("target_layer_ids"))
    with pytest.raises(SpectoolError, match="a DSpark config needs target_layer_ids"):
        load_draft(broken)
