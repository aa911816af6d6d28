"""Every on-disk draft format: save (atomically), load with validation, check against a target, convert.

Formats (SPEC §5), told apart by config.json's `architectures`:

| method | architectures written | also read |
|---|---|---|
| eagle1 | LlamaForCausalLMEagle (SafeAILab keys) | LlamaEagleDraftModel |
| eagle3 | LlamaForCausalLMEagle3 (SGLang / vLLM / SpecForge: midlayer.*, d2t, t2d) | Eagle3LlamaForCausalLM, NeMo `layers.0.*` |
| dflash | DFlashDraftModel (z-lab `dflash` package, vLLM) | Qwen3DFlashDraftModel (NeMo AutoModel) |
| dspark | Qwen3DSparkModel (DeepSpec) | |

NeMo AutoModel exports prefix keys with `model.`; DDP saves with `module.`; both are stripped. Missing or
unexpected weights are an error that lists them: nothing is dropped silently. spectool's own facts about a
draft (its target, method, layer ids, tokenizer length, chat-template hash, version) live in `spectool.json`
beside config.json, a file every other loader ignores.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from spectool import __version__
from spectool.arch import TargetArch
from spectool.drafts import DRAFT_CLASSES, DRAFT_CONFIG_CLASSES, GptOssEagle3DraftModel
from spectool.errors import SpectoolError, UsageError
from spectool.hub import read_json
from spectool.layers import engine_default_eagle3_ids, engine_ids, from_engine_ids
from spectool.paths import (
    check_output_path,
    file_mode,
    fsync_dir,
    refuse_to_replace_input,
    resolve_draft_dir,
)

METADATA_FILE = "spectool.json"
WEIGHTS_FILE = "model.safetensors"

ARCHITECTURES = {
    "eagle1": ("LlamaForCausalLMEagle", "LlamaEagleDraftModel"),
    "eagle3": (
        "LlamaForCausalLMEagle3",
        "Eagle3LlamaForCausalLM",
        "LlamaEagle3DraftModel",
        "GptOssEagle3DraftModel",
        "Eagle3Speculator",  # vLLM speculators format (speculators_config + transformer_layer_config)
        "Eagle3DraftModel",
    ),
    "dflash": ("DFlashDraftModel", "Qwen3DFlashDraftModel"),
    "dspark": ("Qwen3DSparkModel",),
}

#: Keys of config.json that say where EAGLE-3 feature layers come from (SPEC §5): SGLang reads the nested one in
#: spectool's numbering (and adds 1 itself); vLLM reads the top-level one in its own numbering (spectool id + 1).
EAGLE_CONFIG = "eagle_config"
VLLM_AUX_LAYER_IDS = "eagle_aux_hidden_state_layer_ids"

#: Keys a loader needs and silently misses otherwise (SGLang skips unknown keys and falls back to defaults).
REQUIRED_KEYS = {
    "eagle1": ("fc.weight", "embed_tokens.weight"),
    "eagle3": ("fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"),
    "dflash": ("fc.weight", "hidden_norm.weight", "norm.weight"),
    "dspark": ("fc.weight", "hidden_norm.weight", "norm.weight", "embed_tokens.weight", "lm_head.weight"),
}

#: `spectool convert --to X`: which methods each destination layout holds.
CONVERSIONS = {
    "sglang": ("eagle1", "eagle3"),
    "vllm": ("eagle1", "eagle3", "dflash"),
    "dflash": ("dflash",),
    "deepspec": ("dspark",),
}

_PREFIXES = ("module.", "model.", "draft_model.")


@dataclass
class DraftMetadata:
    """What spectool needs to find a draft's target again and to check they belong together."""

    method: str
    target: str | None = None  # the MODEL reference the draft was made for
    target_revision: str | None = None
    target_architectures: list[str] = field(default_factory=list)
    num_target_layers: int | None = None
    target_hidden_size: int | None = None
    target_vocab_size: int | None = None
    tokenizer_length: int | None = None
    chat_template_sha256: str | None = None
    target_layer_ids: list[int] = field(default_factory=list)
    spectool_version: str = __version__
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    training: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DraftMetadata:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class LoadedDraft:
    method: str
    model: nn.Module
    path: Path
    config: dict[str, Any]
    metadata: DraftMetadata | None
    notes: list[str] = field(default_factory=list)

    @property
    def target_layer_ids(self) -> list[int]:
        return list(getattr(self.model.config, "target_layer_ids", None) or [])

    @property
    def layer_ids_unknown(self) -> bool:
        """An EAGLE-3 config that names no feature layers (SpecForge's published configs): the engines' defaults
        for the target's depth apply, which `check_against_target` fills in."""
        return self.method == "eagle3" and not self.target_layer_ids


def chat_template_sha256(template: str | list | dict | None) -> str | None:
    """A stable hash of a chat template (string, or the list/dict form of multi-template tokenizers)."""
    if template is None:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def with_article(method: str) -> str:
    """'an eagle3' / 'a dspark': a method name with the article that reads right before it."""
    return f"{'an' if method[:1] in 'aeiou' else 'a'} {method}"


def detect_method(config: dict[str, Any], where: str = "config.json") -> str:
    """The draft method of a config.json, from its architectures (or its eagle/dflash config blocks)."""
    archs = config.get("architectures") or []
    for method, names in ARCHITECTURES.items():
        if any(a in names for a in archs):
            return method
    if "eagle_config" in config or config.get("speculators_model_type") == "eagle3":
        return "eagle3"
    if "dflash_config" in config:
        return "dflash"
    known = ", ".join(name for names in ARCHITECTURES.values() for name in names)
    raise SpectoolError(f"{where}: architectures {archs} are not a draft format spectool knows ({known})")


# ------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------


def _safetensors_files(directory: Path) -> list[str] | None:
    """The safetensors files of a checkpoint directory (a sharded index, or model.safetensors), or None."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(read_json(index).get("weight_map", {}).values()))
    if (directory / WEIGHTS_FILE).is_file():
        return [WEIGHTS_FILE]
    return None


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: model.safetensors, a sharded index, or pytorch_model.bin."""
    files = _safetensors_files(directory)
    if files is None and (directory / "pytorch_model.bin").is_file():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    if files is None:
        raise SpectoolError(f"{directory} holds no weights (model.safetensors or pytorch_model.bin)")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            with safe_open(directory / name, framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    tensors[key] = handle.get_tensor(key)
        except Exception as exc:  # safetensors' SafetensorError derives from Exception only
            raise SpectoolError(f"{directory / name}: unreadable safetensors file ({exc})") from None
    return tensors


def _normalise_keys(method: str, tensors: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    """Published layouts -> spectool's module names (which are the ecosystem keys of SPEC §5)."""
    out: dict[str, torch.Tensor] = {}
    stripped = renamed = False
    for key, value in tensors.items():
        name = _strip(key)
        stripped |= name != key
        if method == "eagle3" and name.startswith("layers.0."):
            # NeMo AutoModel and vLLM speculators name the EAGLE-3 layer layers.0
            name = "midlayer." + name[len("layers.0.") :]
            renamed = True
        out[name] = value
    if len(out) != len(tensors):
        raise SpectoolError("two checkpoint keys map to the same weight after removing prefixes; the file is ambiguous")
    if stripped or renamed:
        what = [
            w for w, done in (("prefixes model./module. removed", stripped), ("layers.0 -> midlayer", renamed)) if done
        ]
        notes.append(f"renamed published key names to spectool's ({', '.join(what)})")
    return out


def _check_config(method: str, cfg: Any) -> None:
    """Reject values the draft would only trip over later (a ValueError naming the field)."""
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        value = getattr(cfg, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if method in ("dflash", "dspark"):
        block = cfg.block_size
        if not isinstance(block, int) or isinstance(block, bool) or block < 2:
            raise ValueError(f"block_size must be an integer of at least 2, got {block!r}")
    rope = cfg.rope_parameters
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ValueError(f"rope_theta (or rope_parameters.rope_theta) must be a positive number, got {theta!r}")


def _build_empty(method: str, config: dict[str, Any]) -> nn.Module:
    config_cls = DRAFT_CONFIG_CLASSES[method]
    cfg = config_cls.from_dict(dict(config))
    _check_config(method, cfg)
    cls = DRAFT_CLASSES[method]
    if method == "eagle3" and "GptOssEagle3DraftModel" in (config.get("architectures") or []):
        cls = GptOssEagle3DraftModel
    if method == "eagle3" and (cfg.rope_parameters or {}).get("rope_type") == "yarn":
        cls = GptOssEagle3DraftModel
    return cls(cfg)


def load_draft(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    option: str = "--draft",
) -> LoadedDraft:
    """Load a draft directory in any layout spectool reads; missing or unexpected weights are an error.

    A name of `shipped_drafts()` that is not an existing path loads that shipped draft.

    The weights keep their stored dtype unless `dtype` is given (float32 suits CPU decoding and training).
    `option` names the command-line argument that gave `path`, for error messages.
    """
    directory = resolve_draft_dir(path, option)
    config = read_json(directory / "config.json")
    where = str(directory / "config.json")
    metadata = None
    if (directory / METADATA_FILE).is_file():
        metadata = DraftMetadata.from_json(read_json(directory / METADATA_FILE))
    try:
        method = detect_method(config, where)
        raw = read_state_dict(directory)
    except SpectoolError:
        if not _is_safeailab_eagle1(config, _weight_shapes(directory)):
            raise
        method, raw = "eagle1", read_state_dict(directory)
    notes: list[str] = []
    tensors = _normalise_keys(method, raw, notes)
    config = normalise_config(method, config, tensors, notes, where=where, metadata=metadata)
    check_feature_layers(method, config, tensors, where=where)
    try:
        model = _build_empty(method, config)
    except (TypeError, ValueError, KeyError, RuntimeError, StrictDataclassError) as exc:
        reason = " ".join(str(exc).split())  # the config classes' validation errors span several lines
        raise SpectoolError(f"{directory / 'config.json'}: not a valid {method} draft config ({reason})") from None

    expected = model.state_dict()
    if method == "eagle3":
        _resolve_eagle3_vocab_buffers(model, tensors, notes)
        if "embed_tokens.weight" in tensors and "embed_tokens.weight" not in expected:
            del tensors["embed_tokens.weight"]
            notes.append("ignored the checkpoint's embed_tokens.weight: EAGLE-3 drafts use the target's embedding")
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(
                f"unexpected {len(unexpected)}: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
            )
        raise SpectoolError(f"{directory}: weights do not match {with_article(method)} draft ({'; '.join(parts)})")
    wrong = [
        f"{k} {tuple(tensors[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if tensors[k].shape != v.shape
    ]
    if wrong:
        raise SpectoolError(f"{directory}: weight shapes do not match config.json ({'; '.join(wrong[:5])})")
    model.load_state_dict(tensors, strict=True)
    stored = next((v.dtype for v in tensors.values() if v.is_floating_point()), torch.float32)
    model = model.to(device=device, dtype=dtype or stored).eval()
    model.freeze_target_copies()
    return LoadedDraft(method, model, directory, config, metadata, notes)


# ------------------------------------------------------------------------------------------------------------
# Published layouts -> spectool's config (SPEC §5)
# ------------------------------------------------------------------------------------------------------------


def _weight_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a checkpoint's tensors without reading them (a target passed as a draft may be huge)."""
    try:
        files = _safetensors_files(directory)
        if files is None and (directory / "pytorch_model.bin").is_file():
            state = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
            return {k: tuple(v.shape) for k, v in state.items()}
        if files is None:
            return {}
        shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            with safe_open(directory / name, framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        return shapes
    except Exception:  # unreadable: the caller reports the config's own problem
        return {}


def _strip(name: str) -> str:
    while name.startswith(_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def _is_safeailab_eagle1(config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> bool:
    """SafeAILab's EAGLE-1 checkpoints (yuhuili/EAGLE-*) call themselves a plain causal LM (`LlamaForCausalLM`):
    they are told apart by their weights, an `fc` from 2H to H in front of `layers.*`, and no `model.layers.*`."""
    archs = config.get("architectures") or []
    if not archs or not all(str(a).endswith("ForCausalLM") for a in archs):
        return False
    names = {_strip(k): v for k, v in shapes.items()}
    fc, hidden = names.get("fc.weight"), config.get("hidden_size")
    return (
        fc is not None
        and isinstance(hidden, int)
        and tuple(fc) == (hidden, 2 * hidden)
        and any(k.startswith("layers.0.") for k in names)
        and not any(k.startswith(("model.layers.", "midlayer.")) for k in shapes)
    )


def _int_list(value: Any, what: str, where: str) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise SpectoolError(f"{where}: {what} must be a list of integers, got {value!r}")
    return list(value) or None


def _refuse_variants(config: dict[str, Any], flags: Sequence[str], layout: str, where: str) -> None:
    on = [flag for flag in flags if config.get(flag)]
    if on:
        raise SpectoolError(
            f"{where}: this {layout} sets {', '.join(f'{flag}=true' for flag in on)}, an EAGLE-3 variant spectool's "
            "draft does not implement"
        )


def _flatten_speculators_eagle3(config: dict[str, Any], notes: list[str], where: str) -> dict[str, Any]:
    """vLLM `speculators` EAGLE-3 (`Eagle3Speculator`): the decoder layer's Llama config sits in
    `transformer_layer_config`, the EAGLE-3 fields (`draft_vocab_size`, `target_hidden_size`,
    `eagle_aux_hidden_state_layer_ids` in vLLM's numbering, the norm flags) at the top level."""
    layer = config.get("transformer_layer_config")
    if not isinstance(layer, dict) or not layer:
        raise SpectoolError(f"{where}: a speculators EAGLE-3 config needs a transformer_layer_config object")
    _refuse_variants(config, ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output"), "speculators", where)
    if layer.get("model_type", "llama") != "llama":
        raise SpectoolError(
            f"{where}: transformer_layer_config.model_type is {layer.get('model_type')!r}; spectool reads the Llama "
            "EAGLE-3 layer (model_type llama) only"
        )
    out = dict(layer)
    out["architectures"] = ["LlamaForCausalLMEagle3"]
    for key in ("draft_vocab_size", "target_hidden_size", VLLM_AUX_LAYER_IDS):
        if config.get(key) is not None:
            out[key] = config[key]
    notes.append("read a vLLM speculators EAGLE-3 config (transformer_layer_config, layer ids in vLLM's numbering)")
    return out


def _eagle3_config(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], notes: list[str], where: str, depth: int | None
) -> dict[str, Any]:
    archs = config.get("architectures") or []
    if config.get("speculators_model_type") == "eagle3" or "transformer_layer_config" in config:
        config = _flatten_speculators_eagle3(config, notes, where)
    elif "LlamaEagle3DraftModel" in archs and (
        config.get("num_hidden_layers") != 1 or "num_aux_hidden_states" in config
    ):
        # NeMo AutoModel writes the target's text config (its depth in num_hidden_layers) plus the draft fields,
        # and records neither the draft's single layer nor the feature layers it trained on.
        _refuse_variants(config, ("parallel_drafting", "fc_norm", "norm_output"), "NeMo AutoModel export", where)
        config = dict(config)
        if isinstance(config.get("num_hidden_layers"), int) and config["num_hidden_layers"] > 1:
            depth = depth or config["num_hidden_layers"]
            config.setdefault("num_target_layers", config["num_hidden_layers"])
        config["num_hidden_layers"] = 1
        notes.append("read a NeMo AutoModel EAGLE-3 export (num_hidden_layers there is the target's depth)")
    else:
        _refuse_variants(config, ("fc_norm",), "EAGLE-3 config", where)
        config = dict(config)
    depth = depth or (config.get("num_target_layers") if isinstance(config.get("num_target_layers"), int) else None)
    nested = config.get(EAGLE_CONFIG) if isinstance(config.get(EAGLE_CONFIG), dict) else {}
    sglang_ids = _int_list(nested.get(VLLM_AUX_LAYER_IDS), f"{EAGLE_CONFIG}.{VLLM_AUX_LAYER_IDS}", where)
    vllm_ids = _int_list(config.pop(VLLM_AUX_LAYER_IDS, None), VLLM_AUX_LAYER_IDS, where)
    ids = sglang_ids
    if sglang_ids and vllm_ids and engine_ids(sglang_ids) != vllm_ids:
        notes.append(
            f"config.json's {EAGLE_CONFIG} (SGLang, spectool's numbering) names layers {sglang_ids} but its top-level "
            f"{VLLM_AUX_LAYER_IDS} (vLLM, numbering + 1) names layers {from_engine_ids(vllm_ids)}: SGLang and vLLM "
            "read different layers; spectool follows eagle_config"
        )
    elif not sglang_ids and vllm_ids:
        ids = from_engine_ids(vllm_ids)
    if not ids and isinstance(config.get("target_layer_ids"), list):
        ids = _int_list(config.get("target_layer_ids"), "target_layer_ids", where)
    if not ids and depth:
        k = _feature_count(config, tensors)
        if k == 3:
            try:
                ids = engine_default_eagle3_ids(depth)
            except UsageError:
                ids = None
            if ids:
                notes.append(
                    f"config.json names no EAGLE-3 feature layers; using the engines' default for its {depth}-layer "
                    f"target: {ids} (engine ids {engine_ids(ids)})"
                )
    eagle = {k: v for k, v in nested.items() if k != VLLM_AUX_LAYER_IDS}
    if ids:
        eagle[VLLM_AUX_LAYER_IDS] = ids
    config[EAGLE_CONFIG] = eagle
    config.pop("target_layer_ids", None)
    return config


def _feature_count(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> float | None:
    fc = tensors.get("fc.weight")
    width = config.get("target_hidden_size") or config.get("hidden_size")
    if fc is None or fc.dim() != 2 or not isinstance(width, int) or width < 1:
        return None
    return fc.shape[1] / width


def normalise_config(
    method: str,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    notes: list[str],
    *,
    where: str = "config.json",
    metadata: DraftMetadata | None = None,
) -> dict[str, Any]:
    """A published config.json (SpecForge / SGLang, vLLM speculators, NeMo AutoModel, SafeAILab, z-lab, DeepSpec)
    as the config spectool's draft classes read; facts it reads elsewhere (layer ids in vLLM's numbering, a fc bias
    told by the weights) are moved where spectool expects them, with a note."""
    depth = metadata.num_target_layers if metadata else None
    if method == "eagle3":
        return _eagle3_config(config, tensors, notes, where, depth)
    config = dict(config)
    if method == "eagle1" and not set(config.get("architectures") or []) & set(ARCHITECTURES["eagle1"]):
        config["architectures"] = ["LlamaForCausalLMEagle"]
        config.setdefault("fc_bias", "fc.bias" in tensors)
        config.setdefault("final_norm", "norm.weight" in tensors)
        if "qkv_bias" in config:
            config.setdefault("attention_bias", bool(config["qkv_bias"]))
        notes.append(
            "read a SafeAILab EAGLE layout (a one-layer LlamaForCausalLM config; fc bias "
            f"{'yes' if config['fc_bias'] else 'no'}, final norm {'yes' if config['final_norm'] else 'no'})"
        )
    if method == "dflash":
        nested = config.get("dflash_config") if isinstance(config.get("dflash_config"), dict) else {}
        if not nested.get("target_layer_ids") and not config.get("target_layer_ids"):
            n, k = config.get("num_target_layers") or depth, config.get("num_hidden_layers")
            if isinstance(n, int) and isinstance(k, int) and n >= 1 and k >= 1:
                # The z-lab dflash package's default when a config names none (its build_target_layer_ids).
                ids = [n // 2] if k == 1 else [round(1 + i * (n - 4) / (k - 1)) for i in range(k)]
                config["dflash_config"] = {**nested, "target_layer_ids": ids}
                notes.append(f"config.json names no DFlash feature layers; using the dflash package's default {ids}")
    return config


def _config_layer_ids(method: str, config: dict[str, Any]) -> list[int] | None:
    if method == "eagle3":
        return (config.get(EAGLE_CONFIG) or {}).get(VLLM_AUX_LAYER_IDS) or None
    if method == "dflash":
        nested = config.get("dflash_config") if isinstance(config.get("dflash_config"), dict) else {}
        return nested.get("target_layer_ids") or config.get("target_layer_ids") or None
    if method == "dspark":
        return config.get("target_layer_ids") or None
    return None


def check_feature_layers(method: str, config: dict[str, Any], tensors: dict[str, torch.Tensor], *, where: str) -> None:
    """The feature layers config.json names x their width must be what `fc.weight` takes (one-line error)."""
    if method == "eagle1":
        return
    k = _feature_count(config, tensors)
    width = config.get("target_hidden_size") or config.get("hidden_size")
    if k is None:
        return  # no fc.weight (reported as missing) or no width (reported by the config check)
    fc_in = tensors["fc.weight"].shape[1]
    ids = _config_layer_ids(method, config)
    if ids:
        if len(ids) * width != fc_in:
            raise SpectoolError(
                f"{where}: names {len(ids)} feature layers {list(ids)} of width {width} ({len(ids) * width} inputs) but "
                f"fc.weight takes {fc_in} inputs ({k:g} layers); the layer ids and the weights disagree"
            )
    elif method == "eagle3" and k != 3:
        raise SpectoolError(
            f"{where}: names no feature layers and fc.weight takes {fc_in} inputs ({k:g} layers of width {width}), "
            f"not the 3 the engines default to; name them in {EAGLE_CONFIG}.{VLLM_AUX_LAYER_IDS}"
        )
    elif method == "dflash":
        raise SpectoolError(
            f"{where}: names no feature layers (dflash_config.target_layer_ids) and no num_target_layers to derive them"
        )
    elif method == "dspark":
        raise SpectoolError(f"{where}: names no feature layers; a DSpark config needs target_layer_ids")


def _resolve_eagle3_vocab_buffers(model: nn.Module, tensors: dict[str, torch.Tensor], notes: list[str]) -> None:
    """An unpruned EAGLE-3 draft has no d2t / t2d buffers; checkpoints written for engines carry the identity."""
    if "d2t" in model.state_dict():
        return
    d2t, t2d = tensors.get("d2t"), tensors.get("t2d")
    if d2t is None and t2d is None:
        return
    if d2t is not None and bool((d2t == 0).all()) and (t2d is None or bool(t2d.all())):
        tensors.pop("d2t", None)
        tensors.pop("t2d", None)
        return
    raise SpectoolError(
        "this EAGLE-3 checkpoint maps a pruned draft vocabulary (d2t/t2d) but config.json says draft_vocab_size "
        "equals vocab_size; fix draft_vocab_size in config.json"
    )


# ------------------------------------------------------------------------------------------------------------
# Validation against a target
# ------------------------------------------------------------------------------------------------------------


def check_against_target(loaded: LoadedDraft, arch: TargetArch, tokenizer_length: int | None = None) -> list[str]:
    """Raise when the draft cannot serve this target (width, vocabulary, depth, mask token); return warnings
    for softer mismatches (tokenizer length, a different target recorded in the metadata)."""
    cfg = loaded.model.config
    warnings: list[str] = []
    if loaded.layer_ids_unknown:
        n = arch.num_hidden_layers
        try:
            ids = engine_default_eagle3_ids(n)
        except UsageError:
            raise SpectoolError(
                f"{loaded.path / 'config.json'} names no EAGLE-3 feature layers and the engines' default "
                f"[1, N//2-1, N-4] does not fit a {n}-layer target; name them in "
                f"{EAGLE_CONFIG}.{VLLM_AUX_LAYER_IDS}"
            ) from None
        cfg.target_layer_ids = ids
        warnings.append(
            f"config.json names no EAGLE-3 feature layers; using the layers SGLang and vLLM capture by default for a "
            f"{n}-layer target: {ids} (engine ids {engine_ids(ids)})"
        )
    problems: list[str] = []
    feature_width = getattr(cfg, "target_hidden_size", None) or cfg.hidden_size
    if feature_width != arch.hidden_size:
        problems.append(f"it reads features of width {feature_width}, the target's hidden size is {arch.hidden_size}")
    if cfg.vocab_size != arch.vocab_size:
        problems.append(f"its vocabulary has {cfg.vocab_size} rows, the target's {arch.vocab_size}")
    depth = getattr(cfg, "num_target_layers", None)
    if depth is not None and depth != arch.num_hidden_layers:
        problems.append(f"it was made for a target with {depth} layers, this one has {arch.num_hidden_layers}")
    ids = loaded.target_layer_ids
    if ids and not all(-1 <= i <= arch.num_hidden_layers - 1 for i in ids):
        problems.append(f"its feature layers {ids} are outside the target's [-1, {arch.num_hidden_layers - 1}]")
    mask = getattr(cfg, "mask_token_id", None)
    if mask is not None and not 0 <= mask < arch.vocab_size:
        problems.append(f"its mask token {mask} is outside the target's embedding [0, {arch.vocab_size - 1}]")
    if problems:
        raise SpectoolError(
            f"the {loaded.method} draft at {loaded.path} does not fit this target: " + "; ".join(problems)
        )
    meta = loaded.metadata
    if meta and tokenizer_length and meta.tokenizer_length and meta.tokenizer_length != tokenizer_length:
        warnings.append(
            f"the draft was trained with a tokenizer of length {meta.tokenizer_length}, the target's has "
            f"{tokenizer_length}: expect low acceptance"
        )
    return warnings


# ------------------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------------------


def _export_state_dict(method: str, model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if method == "eagle3" and "d2t" not in tensors:
        # Engines look for d2t / t2d even without pruning; the identity mapping keeps them from guessing.
        tensors["d2t"] = torch.zeros(model.config.draft_vocab_size or model.config.vocab_size, dtype=torch.long)
        tensors["t2d"] = torch.ones(model.config.vocab_size, dtype=torch.bool)
    missing = [k for k in REQUIRED_KEYS[method] if k not in tensors]
    if missing:
        raise SpectoolError(f"refusing to write {with_article(method)} checkpoint without {', '.join(missing)}")
    return tensors


def save_draft(
    model: nn.Module,
    out: str | Path,
    *,
    method: str,
    metadata: DraftMetadata | None = None,
    dtype: torch.dtype | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write `model` to directory `out` in the method's ecosystem format, atomically.

    Everything is written into a temporary sibling directory first, then swapped in with renames, so a kill at
    any moment leaves either the previous checkpoint or the new one, never a half-written directory.
    """
    out = Path(out).expanduser()
    check_output_path(out)
    tensors = _export_state_dict(method, model)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    config = model.config.to_dict()
    config["torch_dtype"] = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
    config.pop("dtype", None)
    if method == "eagle3":
        _write_eagle3_layer_ids(config, list(getattr(model.config, "target_layer_ids", None) or []))
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as exc:
        raise SpectoolError(f"cannot write {out}: {exc.strerror or exc}") from None
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if metadata is not None:
            (tmp / METADATA_FILE).write_text(json.dumps(metadata.to_json(), indent=2) + "\n")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        mode = file_mode()  # safetensors writes 0600 whatever the umask; the user expects 0644 under 022
        for child in tmp.iterdir():
            os.chmod(child, mode)
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(tmp)
        _swap_in(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_eagle3_layer_ids(config: dict[str, Any], ids: list[int]) -> None:
    """Name the feature layers for both engines: `eagle_config.eagle_aux_hidden_state_layer_ids` in spectool's
    numbering for SGLang (which adds 1 itself) and a top-level `eagle_aux_hidden_state_layer_ids` in vLLM's numbering
    (spectool id + 1), the only key vLLM reads. With no ids known, neither is written: the engines' defaults apply."""
    eagle = dict(config.get(EAGLE_CONFIG) or {})
    eagle.pop(VLLM_AUX_LAYER_IDS, None)
    config.pop(VLLM_AUX_LAYER_IDS, None)
    if ids:
        eagle[VLLM_AUX_LAYER_IDS] = list(ids)
        config[VLLM_AUX_LAYER_IDS] = engine_ids(ids)
    config[EAGLE_CONFIG] = {**eagle, "use_aux_hidden_state": True}


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp` with renames only (each atomic on POSIX)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def convert(src: str | Path, to: str, out: str | Path) -> LoadedDraft:
    """Re-save a draft in the layout another tool loads, then prove it by loading the result."""
    if to not in CONVERSIONS:
        raise UsageError(f"--to must be one of {', '.join(CONVERSIONS)}, got {to!r}")
    loaded = load_draft(src, option="SRC")
    if loaded.method not in CONVERSIONS[to]:
        raise UsageError(
            f"{with_article(loaded.method)} draft has no {to} layout ({to} holds {', '.join(CONVERSIONS[to])} drafts)"
        )
    refuse_to_replace_input(out, loaded.path, "SRC")
    metadata = loaded.metadata or DraftMetadata(method=loaded.method, target_layer_ids=loaded.target_layer_ids)
    metadata.target = relocated_target(metadata.target, loaded.path, Path(out).expanduser())
    save_draft(loaded.model, out, method=loaded.method, metadata=metadata)
    return load_draft(out)


def relocated_target(target: str | None, old: Path, new: Path) -> str | None:
    """A draft's recorded target as seen from its copy at `new`: a path relative to the draft ("./", "../", how
    shipped drafts record theirs) is rewritten to reach the same directory; absolute paths and Hub ids stay."""
    if not target or not target.startswith(("./", "../")):
        return target
    directory = (old / target).resolve()
    try:
        relative = Path(os.path.relpath(directory, new.resolve())).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        return str(directory)
    return relative if relative == ".." or relative.startswith("../") else f"./{relative}"
