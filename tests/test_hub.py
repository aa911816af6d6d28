"""Model references: local directories, config.json paths, a fake Hub cache, offline mode and the catalog.

No network: every test runs with the Hub offline or pointed at a closed local port.
"""

import json
from pathlib import Path

import pytest
from huggingface_hub import constants

from spectool import hub
from spectool.arch import ConfigError
from spectool.errors import SpectoolError, UsageError
from spectool.hub import resolve_model

TINY = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "num_hidden_layers": 4,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 300,
}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch, tmp_path):
    """An empty Hub cache and offline mode for every test; tests that need otherwise change it."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub._hub_unreachable.cache_clear()
    return tmp_path / "hub-cache"


def write_model(directory: Path, config=TINY, tokenizer=None, tokenizer_config=None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if tokenizer is not None:
        (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    if tokenizer_config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


def fake_cache(cache: Path, repo_id: str, files: dict[str, dict]) -> None:
    """The on-disk layout huggingface_hub reads: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        (snapshot / name).write_text(json.dumps(content))


def test_local_directory_with_exact_tokenizer_length(tmp_path):
    tokenizer = {"model": {"vocab": {f"t{i}": i for i in range(250)}}, "added_tokens": [{"id": 250}, {"id": 251}]}
    info = resolve_model(str(write_model(tmp_path / "m", tokenizer=tokenizer)))
    assert info.source == "local" and info.arch.num_hidden_layers == 4
    assert info.tokenizer_length == 252 and info.tokenizer_length_source == "tokenizer.json"
    assert info.directory == tmp_path / "m"


def test_config_json_path(tmp_path):
    path = write_model(tmp_path / "m") / "config.json"
    info = resolve_model(str(path))
    assert info.config_path == path and info.arch.hidden_size == 64


def test_tokenizer_length_from_added_tokens(tmp_path):
    added = {str(i): {"content": f"<s{i}>"} for i in range(280, 290)}
    info = resolve_model(str(write_model(tmp_path / "m", tokenizer_config={"added_tokens_decoder": added})))
    assert info.tokenizer_length == 290 and "added tokens" in info.tokenizer_length_source
    # Added ids far below vocab_size say nothing about len(tokenizer).
    low = {str(i): {"content": f"<s{i}>"} for i in range(0, 3)}
    info = resolve_model(str(write_model(tmp_path / "n", tokenizer_config={"added_tokens_decoder": low})))
    assert info.tokenizer_length is None


@pytest.mark.parametrize("ref", ["./missing-dir", "/no/such/model", "missing/config.json", "~/nope/x.json"])
def test_missing_path_is_a_usage_error(ref):
    with pytest.raises(UsageError, match="no such file or directory") as info:
        resolve_model(ref)
    assert info.value.exit_code == 2


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="has no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_malformed_config_names_file(tmp_path):
    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "config.json").write_text('{"num_hidden_layers": 4,')
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON") as info:
        resolve_model(str(directory))
    assert info.value.exit_code == 1
    write_model(directory, {**TINY, "hidden_size": "big"})
    with pytest.raises(ConfigError, match="field 'hidden_size'"):
        resolve_model(str(directory))


def test_hub_id_from_offline_cache(offline_hub):
    added = {str(i): {"content": f"<s{i}>"} for i in range(280, 290)}
    fake_cache(
        offline_hub, "acme/tiny", {"config.json": TINY, "tokenizer_config.json": {"added_tokens_decoder": added}}
    )
    info = resolve_model("acme/tiny")
    assert info.source == "cache"
    assert info.arch.num_hidden_layers == 4 and info.tokenizer_length == 290
    assert info.config_path.parent.name == COMMIT
    assert "HF_HUB_OFFLINE" in info.notes[0]


def test_unreachable_hub_answers_from_cache_at_once(monkeypatch, offline_hub):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    fake_cache(offline_hub, "acme/tiny", {"config.json": TINY})
    info = resolve_model("acme/tiny")
    assert info.source == "cache" and "127.0.0.1:9 is unreachable" in info.notes[0]


def test_catalog_fallback_is_visible():
    info = resolve_model("Qwen/Qwen3-8B")
    assert info.source == "catalog"
    assert "built-in catalog" in info.notes[0]
    assert info.arch.num_hidden_layers == 36 and info.tokenizer_length == 151669
    assert resolve_model("qwen/qwen3-8b").ref == "Qwen/Qwen3-8B"  # ids are case-insensitive on the Hub


def test_catalog_fallback_with_revision_says_so():
    info = resolve_model("Qwen/Qwen3-8B", revision="v2")
    assert "not 'v2'" in info.notes[0]


def test_unknown_offline_id_says_how_to_fix():
    with pytest.raises(SpectoolError) as info:
        resolve_model("acme/unknown-model")
    message = str(info.value)
    assert info.value.exit_code == 1
    for hint in ("local model directory", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_HUB_OFFLINE is set"):
        assert hint in message


def test_cached_config_beats_catalog(offline_hub):
    fake_cache(offline_hub, "Qwen/Qwen3-8B", {"config.json": {**TINY, "num_hidden_layers": 3}})
    info = resolve_model("Qwen/Qwen3-8B")
    assert info.source == "cache" and info.arch.num_hidden_layers == 3
    assert info.tokenizer_length == 151669  # the catalog still knows len(tokenizer)


def test_default_model_missing_is_a_usage_error(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "DEFAULT_MODEL_DIR", tmp_path / "nothing")
    with pytest.raises(UsageError, match="embedded tiny target"):
        hub.default_model_ref()


def test_the_embedded_target_is_called_tiny_unless_a_path_of_that_name_is_in_the_way(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    info = hub.resolve_model("tiny")
    assert info.ref == "tiny" and info.directory == hub.DEFAULT_MODEL_DIR and info.arch.num_hidden_layers == 8
    (tmp_path / "tiny").mkdir()  # the user's own directory called tiny wins (and has no config.json)
    with pytest.raises(UsageError, match="has no config.json"):
        hub.resolve_model("tiny")
