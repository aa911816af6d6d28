"""Every on-disk draft format: save (atomically), load with validation, check against a target, convert.

Formats are told apart by config.json's `architectures` (`DraftMethod.checkpoint_architectures`: the
first is written, all are read); what a method's published layouts need (renamed keys, config fields kept
elsewhere, buffers engines expect) is that method's own hooks in `spectool/methods/`. NeMo AutoModel exports prefix
keys with `model.`; DDP saves with `module.`; both are stripped. Missing or unexpected weights are an error that
lists them: nothing is dropped silently. spectool's own facts about a
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
from spectool.draft_vocab import VOCAB_FILE, check_draft_vocab, read_draft_vocab
from spectool.errors import SpectoolError, UsageError
from spectool.hub import read_json
from spectool.methods.base import DraftMethod, PublishedConfig, strip_prefixes
from spectool.paths import (
    check_output_path,
    file_mode,
    fsync_dir,
    refuse_to_replace_input,
    resolve_draft_dir,
)
from spectool.registry import check_conversion, detect_method, get, methods, with_article

METADATA_FILE = "spectool.json"
WEIGHTS_FILE = "model.safetensors"


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
    """A draft read from disk: its method's name, the model, where it came from, its (normalised) config.json,
    its spectool.json and the notes of what was read or renamed."""

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


def _normalise_keys(method: DraftMethod, tensors: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    """Published layouts -> spectool's module names (which are the published layouts' keys)."""
    out: dict[str, torch.Tensor] = {}
    stripped = renamed = False
    for key, value in tensors.items():
        name = strip_prefixes(key)
        stripped |= name != key
        own = method.checkpoint_key(name)
        renamed |= own != name
        out[own] = value
    if len(out) != len(tensors):
        raise SpectoolError("two checkpoint keys map to the same weight after removing prefixes; the file is ambiguous")
    if stripped or renamed:
        what = [
            w for w, done in (("prefixes model./module. removed", stripped), (method.key_renaming, renamed)) if done
        ]
        notes.append(f"renamed published key names to spectool's ({', '.join(what)})")
    return out


def _build_empty(method: DraftMethod, config: dict[str, Any]) -> nn.Module:
    cfg = method.config_class().from_dict(dict(config))
    method.check_config(cfg)
    return method.model_class(config)(cfg)


def _read_method_and_weights(directory: Path, config: dict[str, Any]) -> tuple[DraftMethod, dict[str, torch.Tensor]]:
    """The method a checkpoint holds (by its config, else by its weights' shapes) and its tensors."""
    try:
        method = detect_method(config, str(directory / "config.json"))
        return method, read_state_dict(directory)
    except SpectoolError:
        shapes = _weight_shapes(directory)
        for method in methods():
            if method.claims_by_weights(config, shapes):
                return method, read_state_dict(directory)
        raise


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
    method, raw = _read_method_and_weights(directory, config)
    notes: list[str] = []
    tensors = _normalise_keys(method, raw, notes)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    depth = metadata.num_target_layers if metadata else None
    config = method.normalise_config(PublishedConfig(config, shapes, where, depth, notes))
    method.check_feature_layers(config, shapes, where)
    try:
        model = _build_empty(method, config)
    except (TypeError, ValueError, KeyError, RuntimeError, StrictDataclassError) as exc:
        reason = " ".join(str(exc).split())  # the config classes' validation errors span several lines
        raise SpectoolError(f"{where}: not a valid {method.name} draft config ({reason})") from None
    method.adapt_loaded_weights(model, tensors, notes)
    _check_weights(directory, method.name, model.state_dict(), tensors)
    model.load_state_dict(tensors, strict=True)
    stored = next((v.dtype for v in tensors.values() if v.is_floating_point()), torch.float32)
    model = model.to(device=device, dtype=dtype or stored).eval()
    model.freeze_target_copies()
    return LoadedDraft(method.name, model, directory, config, metadata, notes)


def draft_vocab(loaded: LoadedDraft) -> torch.Tensor | None:
    """The draft's decode-time vocabulary (draft_vocab.safetensors), checked against its method and vocabulary; None
    without the file. Read by decoding only, so `spectool data vocab` can still rewrite a file that fails here."""
    directory, config = loaded.path, loaded.config
    ids = read_draft_vocab(directory)
    if ids is None:
        return None
    method = get(loaded.method)
    if not method.takes_draft_vocab:
        raise SpectoolError(
            f"{directory / VOCAB_FILE}: {with_article(method.name)} draft does not read a full-vocabulary head, so a "
            "draft vocabulary does not apply (EAGLE-3 keeps its own in d2t / t2d); remove the file"
        )
    if isinstance(config.get("vocab_size"), int):
        check_draft_vocab(ids, config["vocab_size"], str(directory / VOCAB_FILE))
    return ids


def _check_weights(
    directory: Path, method: str, expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]
) -> None:
    """Missing, unexpected or mis-shaped weights: one error that lists them."""
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


# ------------------------------------------------------------------------------------------------------------
# Validation against a target
# ------------------------------------------------------------------------------------------------------------


def check_against_target(loaded: LoadedDraft, arch: TargetArch, tokenizer_length: int | None = None) -> list[str]:
    """Raise when the draft cannot serve this target (width, vocabulary, depth, mask token); return warnings
    for softer mismatches (tokenizer length, a different target recorded in the metadata)."""
    cfg = loaded.model.config
    warnings: list[str] = []
    try:
        default = get(loaded.method).layer_ids_for_target(loaded.target_layer_ids, arch.num_hidden_layers)
    except SpectoolError as exc:
        raise SpectoolError(f"{loaded.path / 'config.json'} {exc}") from None
    if default is not None:
        cfg.target_layer_ids, note = default
        warnings.append(note)
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
    problems += get(loaded.method).target_fit_problems(cfg, arch)
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


def _export_state_dict(method: DraftMethod, model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    method.export_weights(model, tensors)
    missing = [k for k in method.required_keys if k not in tensors]
    if missing:
        raise SpectoolError(f"refusing to write {with_article(method.name)} checkpoint without {', '.join(missing)}")
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
    tensors = _export_state_dict(get(method), model)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    config = model.config.to_dict()
    config["torch_dtype"] = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
    config.pop("dtype", None)
    get(method).export_config(config, model)
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
    check_conversion(None, to)
    loaded = load_draft(src, option="SRC")
    check_conversion(loaded.method, to)
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
