"""Drafts in the layouts other projects publish (tests/fixtures/*/SOURCE.md says where each comes from).

Each fixture is a published config.json with its sizes shrunk to a tiny target; the test writes weights with the
published tensor names, then `load_draft` reads them, `spectool chat --prompt` answers and `spectool bench` checks
that greedy output equals the target's own on every prompt.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM, Qwen3ForCausalLM

from spectool.checkpoint import check_against_target, load_draft
from spectool.errors import SpectoolError
from spectool.hub import resolve_model
from tests.cli.conftest import invoke
from tests.conftest import save_chat_target, tiny_llama_config, tiny_qwen3_config

FIXTURES = Path(__file__).parent / "fixtures"
H, V, N = 64, 128, 8  # the tiny targets every fixture is shrunk to


def _norm(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.ones(shape)


def _random(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape) * 0.05


def _vocab_map(draft_vocab: int, vocab: int) -> dict[str, torch.Tensor]:
    """d2t / t2d of a pruned draft vocabulary: the kept target ids, sorted (d2t = target id - draft id)."""
    kept = torch.randperm(vocab, generator=torch.Generator().manual_seed(3))[:draft_vocab].sort().values
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[kept] = True
    return {"d2t": kept - torch.arange(draft_vocab), "t2d": t2d}


def _attention(prefix: str, in_features: int, heads: int, kv_heads: int, head_dim: int) -> dict[str, tuple]:
    return {
        f"{prefix}.q_proj.weight": (heads * head_dim, in_features),
        f"{prefix}.k_proj.weight": (kv_heads * head_dim, in_features),
        f"{prefix}.v_proj.weight": (kv_heads * head_dim, in_features),
        f"{prefix}.o_proj.weight": (H, heads * head_dim),
    }


def _mlp(prefix: str, inner: int) -> dict[str, tuple]:
    return {
        f"{prefix}.gate_proj.weight": (inner, H),
        f"{prefix}.up_proj.weight": (inner, H),
        f"{prefix}.down_proj.weight": (H, inner),
    }


def _eagle3_layer(prefix: str, heads: int, kv_heads: int, head_dim: int) -> dict[str, tuple]:
    """The EAGLE-3 decoder layer: q/k/v read cat(embeddings, fused features), 2H wide."""
    return {
        **_attention(f"{prefix}.self_attn", 2 * H, heads, kv_heads, head_dim),
        **_mlp(f"{prefix}.mlp", 128),
        f"{prefix}.input_layernorm.weight": (H,),
        f"{prefix}.hidden_norm.weight": (H,),
        f"{prefix}.post_attention_layernorm.weight": (H,),
    }


def _qwen3_block_layers(count: int, heads: int, kv_heads: int, head_dim: int) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for i in range(count):
        out.update(_attention(f"layers.{i}.self_attn", H, heads, kv_heads, head_dim))
        out[f"layers.{i}.self_attn.q_norm.weight"] = (head_dim,)
        out[f"layers.{i}.self_attn.k_norm.weight"] = (head_dim,)
        out.update(_mlp(f"layers.{i}.mlp", 128))
        out[f"layers.{i}.input_layernorm.weight"] = (H,)
        out[f"layers.{i}.post_attention_layernorm.weight"] = (H,)
    return out


def _specforge_eagle3() -> dict[str, tuple]:
    return {
        "embed_tokens.weight": (V, H),
        **_eagle3_layer("midlayer", 4, 2, 16),
        "fc.weight": (H, 3 * H),
        "norm.weight": (H,),
        "lm_head.weight": (64, H),
    }


def _speculators_eagle3() -> dict[str, tuple]:
    return {
        "embed_tokens.weight": (V, H),
        **_eagle3_layer("layers.0", 4, 2, 16),
        "fc.weight": (H, 3 * H),
        "norm.weight": (H,),
        "lm_head.weight": (64, H),
    }


def _nemo_eagle3() -> dict[str, tuple]:
    return {
        "model.embed_tokens.weight": (V, H),
        **_eagle3_layer("model.layers.0", 4, 2, 32),
        "model.fc.weight": (H, 3 * H),
        "model.norm.weight": (H,),
        "lm_head.weight": (64, H),
    }


def _zlab_dflash() -> dict[str, tuple]:
    return {
        **_qwen3_block_layers(2, 4, 2, 16),
        "fc.weight": (H, 2 * H),
        "hidden_norm.weight": (H,),
        "norm.weight": (H,),
    }


def _deepspec_dspark() -> dict[str, tuple]:
    rank = 16
    return {
        "embed_tokens.weight": (V, H),
        **_qwen3_block_layers(2, 4, 2, 32),
        "norm.weight": (H,),
        "fc.weight": (H, 2 * H),
        "hidden_norm.weight": (H,),
        "lm_head.weight": (V, H),
        "markov_head.markov_w1.weight": (V, rank),
        "markov_head.markov_w2.weight": (V, rank),
        "confidence_head.proj.weight": (1, H + rank),
        "confidence_head.proj.bias": (1,),
    }


def _safeailab_eagle1() -> dict[str, tuple]:
    return {
        "embed_tokens.weight": (V, H),
        "fc.weight": (H, 2 * H),
        **_attention("layers.0.self_attn", H, 4, 2, 16),
        **_mlp("layers.0.mlp", 128),
        "layers.0.post_attention_layernorm.weight": (H,),
    }


@dataclass(frozen=True)
class Layout:
    shapes: object  # () -> {name: shape}
    target: str  # which tiny target: "qwen3" or "llama"
    method: str
    ids_on_load: list[int] | None  # feature layers known from config.json alone
    ids_for_target: list[int] | None  # after check_against_target
    vocab_map: bool = False  # d2t / t2d of a 64-token draft vocabulary
    weights_file: str = "model.safetensors"


LAYOUTS = {
    # The SpecForge config names no layers: the engines' defaults for the 8-layer target, [1, 3, 4], apply.
    "specforge_eagle3": Layout(_specforge_eagle3, "qwen3", "eagle3", None, [1, 3, 4], vocab_map=True),
    "speculators_eagle3": Layout(_speculators_eagle3, "qwen3", "eagle3", [1, 4, 6], [1, 4, 6], vocab_map=True),
    # NeMo writes the target's depth into num_hidden_layers, which gives the default ids at load time.
    "nemo_eagle3": Layout(_nemo_eagle3, "qwen3", "eagle3", [1, 3, 4], [1, 3, 4], vocab_map=True),
    "zlab_dflash": Layout(_zlab_dflash, "qwen3", "dflash", [1, 5], [1, 5]),
    "deepspec_dspark": Layout(_deepspec_dspark, "qwen3", "dspark", [1, 5], [1, 5]),
    "safeailab_eagle1": Layout(_safeailab_eagle1, "llama", "eagle1", None, None, weights_file="pytorch_model.bin"),
}


def write_published_draft(name: str, directory: Path) -> Path:
    """The fixture's config.json plus weights with the published names and shrunk shapes."""
    layout = LAYOUTS[name]
    shutil.copytree(FIXTURES / name, directory)
    torch.manual_seed(7)
    tensors = {
        key: (_norm(shape) if key.endswith("norm.weight") else _random(shape)) for key, shape in layout.shapes().items()
    }
    if layout.vocab_map:
        tensors.update(_vocab_map(64, V))
    if layout.weights_file == "pytorch_model.bin":
        torch.save(tensors, directory / layout.weights_file)
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / layout.weights_file))
    return directory


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    """Tiny chat targets the fixtures are shrunk to: Qwen3 (8 layers, width 64, 4 heads x 32, 2 kv heads,
    vocabulary 128) and Llama (4 layers, width 64, rope theta 500000), both with the word-level ChatML tokenizer."""
    from tests.chat_tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    root = tmp_path_factory.mktemp("published-targets")
    torch.manual_seed(0)
    qwen3 = Qwen3ForCausalLM(
        tiny_qwen3_config(num_hidden_layers=N, vocab_size=V, rope_theta=1000000.0, eos_token_id=eos, pad_token_id=pad)
    )
    llama = LlamaForCausalLM(
        tiny_llama_config(num_hidden_layers=4, vocab_size=V, intermediate_size=128, eos_token_id=eos, pad_token_id=pad)
    )
    return {
        "qwen3": save_chat_target(qwen3, root / "qwen3", tokenizer),
        "llama": save_chat_target(llama, root / "llama", tokenizer),
    }


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("published-prompts") / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p}) for p in ("hi there", "tell me about cats")) + "\n")
    return path


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_published_layout_loads_chats_and_benches_losslessly(name, targets, prompts, tmp_path):
    layout = LAYOUTS[name]
    draft = write_published_draft(name, tmp_path / name)
    target = targets[layout.target]

    loaded = load_draft(draft)
    assert loaded.method == layout.method
    assert (loaded.target_layer_ids or None) == layout.ids_on_load
    check_against_target(loaded, resolve_model(str(target)).arch, 97)
    assert (loaded.target_layer_ids or None) == layout.ids_for_target

    chat = invoke("chat", "--draft", str(draft), "--target", str(target), "--prompt", "hi there", "-n", "8")
    assert chat.exit_code == 0, chat.output
    assert "acceptance length" in chat.stdout

    args = ["bench", "--draft", str(draft), "--target", str(target), "--prompts", str(prompts), "-n", "8"]
    bench = invoke(*args, "--baselines", "target", "--json")
    assert bench.exit_code == 0, bench.output
    data = json.loads(bench.stdout)
    assert data["method"] == layout.method
    assert data["lossless"] is True and data["mismatched_prompts"] == []  # greedy output == the target's own


def test_specforge_config_without_layer_ids_uses_the_engine_default(targets, tmp_path):
    """The crash users hit: a SpecForge EAGLE-3 config has no eagle_config, so the feature layers are the ones SGLang
    and vLLM capture by default, three of them (fc takes 3H), never the single last layer."""
    draft = write_published_draft("specforge_eagle3", tmp_path / "sf")
    loaded = load_draft(draft)
    assert not loaded.target_layer_ids and loaded.model.fc.in_features == 3 * H
    warnings = check_against_target(loaded, resolve_model(str(targets["qwen3"])).arch)
    assert loaded.target_layer_ids == [1, 3, 4]
    assert any("[1, 3, 4] (engine ids [2, 4, 5])" in w for w in warnings)
    assert any("embed_tokens" in note for note in loaded.notes)  # SpecForge saves one; EAGLE-3 uses the target's


def test_specforge_weights_that_read_two_layers_are_a_one_line_error(tmp_path):
    draft = write_published_draft("specforge_eagle3", tmp_path / "sf")
    weights = load_file(draft / "model.safetensors")
    weights["fc.weight"] = torch.zeros(H, 2 * H)
    save_file(weights, str(draft / "model.safetensors"))
    with pytest.raises(SpectoolError, match=r"names no feature layers and fc.weight takes 128 inputs \(2 layers") as e:
        load_draft(draft)
    assert "\n" not in str(e.value)
    result = invoke("chat", "--draft", str(draft), "--target", str(tmp_path), "--prompt", "hi")
    assert result.exit_code == 1 and "fc.weight takes 128 inputs" in result.stderr


def test_speculators_ids_are_read_in_vllms_numbering(tmp_path):
    loaded = load_draft(write_published_draft("speculators_eagle3", tmp_path / "spec"))
    assert loaded.target_layer_ids == [1, 4, 6]  # engine ids [2, 5, 7] - 1
    assert any("speculators" in note for note in loaded.notes)


@pytest.mark.parametrize("flag", ["norm_before_residual", "norm_before_fc", "fc_norm", "norm_output"])
def test_speculators_variants_spectool_does_not_implement_are_refused(tmp_path, flag):
    draft = write_published_draft("speculators_eagle3", tmp_path / "spec")
    config = json.loads((draft / "config.json").read_text())
    config[flag] = True
    (draft / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpectoolError, match=f"{flag}=true, an EAGLE-3 variant"):
        load_draft(draft)


def test_safeailab_eagle1_layout_is_recognised_from_its_weights(tmp_path):
    loaded = load_draft(write_published_draft("safeailab_eagle1", tmp_path / "eagle"))
    assert loaded.method == "eagle1"
    assert not loaded.model.config.fc_bias and not loaded.model.config.final_norm  # "bias": false, no norm.weight
    assert any("SafeAILab" in note for note in loaded.notes)


def test_zlab_fixture_is_what_the_dflash_package_loads(tmp_path):
    dflash_model = pytest.importorskip("dflash.model")
    draft = write_published_draft("zlab_dflash", tmp_path / "dflash")
    model, info = dflash_model.DFlashDraftModel.from_pretrained(draft, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.target_layer_ids == load_draft(draft).target_layer_ids == [1, 5]


def test_a_target_model_passed_as_a_draft_is_still_refused(targets):
    for target in targets.values():  # LlamaForCausalLM / Qwen3ForCausalLM with model.layers.*: not SafeAILab's fc
        with pytest.raises(SpectoolError, match="not a draft format spectool knows"):
            load_draft(target)
