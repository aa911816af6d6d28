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
from spectool.hub import ASSETS_DIR, read_json
from spectool.paths import check_output_path, file_mode, fsync_dir, refuse_to_replace_input

METADATA_FILE = "spectool.json"
WEIGHTS_FILE = "model.safetensors"
SHIPPED_DRAFTS_DIR = ASSETS_DIR / "drafts"

ARCHITECTURES = {
    "eagle1": ("LlamaForCausalLMEagle", "LlamaEagleDraftModel"),
    "eagle3": ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM", "LlamaEagle3DraftModel", "GptOssEagle3DraftModel"),
    "dflash": ("DFlashDraftModel", "Qwen3DFlashDraftModel"),
    "dspark": ("Qwen3DSparkModel",),
}

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
    if "eagle_config" in config:
        return "eagle3"
    if "dflash_config" in config:
        return "dflash"
    known = ", ".join(name for names in ARCHITECTURES.values() for name in names)
    raise SpectoolError(f"{where}: architectures {archs} are not a draft format spectool knows ({known})")


# ------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: model.safetensors, a sharded index, or pytorch_model.bin."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json(index).get("weight_map", {}).values()))
    elif (directory / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    elif (directory / "pytorch_model.bin").is_file():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
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
    for key, value in tensors.items():
        name = key
        while name.startswith(_PREFIXES):
            name = name.split(".", 1)[1]
        if method == "eagle3" and name.startswith("layers.0."):
            name = "midlayer." + name[len("layers.0.") :]  # NeMo AutoModel names the EAGLE-3 layer layers.0
        out[name] = value
    if len(out) != len(tensors):
        raise SpectoolError("two checkpoint keys map to the same weight after removing prefixes; the file is ambiguous")
    if out.keys() != tensors.keys():
        notes.append("renamed published key names to spectool's (prefixes model./module. removed)")
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


def shipped_drafts() -> list[str]:
    """Names of the drafts shipped inside the package for the embedded tiny target (``--draft dspark``)."""
    if not SHIPPED_DRAFTS_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DRAFTS_DIR.iterdir() if (p / "config.json").is_file())


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
    directory = Path(path).expanduser()
    if not directory.exists():
        shipped = shipped_drafts()
        if str(path) not in shipped:
            listing = f" (drafts shipped with spectool: {', '.join(shipped)})" if shipped else ""
            raise UsageError(f"no such draft directory: {path}{listing}")
        directory = SHIPPED_DRAFTS_DIR / str(path)
    if not (directory / "config.json").is_file():
        raise UsageError(f"{directory} has no config.json; point {option} at a draft checkpoint directory")
    config = read_json(directory / "config.json")
    method = detect_method(config, str(directory / "config.json"))
    notes: list[str] = []
    tensors = _normalise_keys(method, read_state_dict(directory), notes)
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
    metadata = None
    if (directory / METADATA_FILE).is_file():
        metadata = DraftMetadata.from_json(read_json(directory / METADATA_FILE))
    return LoadedDraft(method, model, directory, config, metadata, notes)


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
    warnings: list[str] = []
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
