"""spectool's native few-row kernel (few_rows.c): built once per machine with its C compiler, called via ctypes.

The kernel multiplies fp32 token rows by a row-major weight, reading the weight once per call and prefetching it
far enough ahead that eight rows cost little more than one (BLAS spends 2-3x longer there on CPUs); each token's
result is bit-identical whatever the number of rows beside it. It is one more form the kernel planner times
(`kernels.FORMS`), chosen only where it measures faster.

Building needs a C compiler with OpenMP (``$CC``, else ``cc``): the shared library is compiled with
``-O3 -march=native -ffp-contract=off -fopenmp`` into spectool's cache dir, keyed by the source, the compiler and the CPU, so it is
built once (about a second) and reused. Where no compiler works the planner simply does without it;
`unavailable_reason()` says why (bench --profile prints it).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

from spectool.hardware import cpu_name
from spectool.paths import cache_dir

SOURCE = Path(__file__).with_name("few_rows.c")
#: -ffp-contract=off: no multiply-add is fused in one tile shape and not in another (each token's sum stays the same)
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
VERSION = 1  # what spectool_few_rows_version() returns for this source

_loaded: tuple[ctypes._CFuncPtr | None, str] | None = None  # (the kernel or None, why not) once looked up


def kernel() -> ctypes._CFuncPtr | None:
    """The compiled kernel's entry point, built (or found in the cache) on first use; None where it cannot be."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded[0]


def unavailable_reason() -> str:
    """Why `kernel()` is None ('' when it is not)."""
    kernel()
    return _loaded[1]


def few_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x` [..., in] @ `weight` [out, in].T -> [..., out] by the native kernel: contiguous float32 CPU tensors."""
    entry = kernel()
    if entry is None:
        raise RuntimeError(f"the native kernel is not available: {unavailable_reason()}")
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or not (x.is_contiguous() and weight.is_contiguous()):
        raise ValueError("the native kernel multiplies contiguous float32 tensors")
    if not (x.is_cpu and weight.is_cpu) or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"the native kernel cannot multiply {tuple(x.shape)} by {tuple(weight.shape)}.T on the CPU")
    out = torch.empty((*x.shape[:-1], weight.shape[0]))
    width = weight.shape[1]
    rows = x.numel() // width if width else 0
    if rows and weight.shape[0]:
        entry(x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, weight.shape[0], width, torch.get_num_threads())
    elif weight.shape[0]:
        out.zero_()  # no inputs to sum over (in = 0)
    return out


def _load() -> tuple[ctypes._CFuncPtr | None, str]:
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        return None, f"no C compiler ({os.environ.get('CC') or 'cc'}) on PATH"
    try:
        library = _built(compiler)
        try:
            handle = ctypes.CDLL(str(library))
        except OSError:  # a damaged file in the cache: built again, once
            library.unlink(missing_ok=True)
            handle = ctypes.CDLL(str(_built(compiler)))
        if handle.spectool_few_rows_version() != VERSION:
            return None, f"{library} is another build of the kernel"
    except (OSError, AttributeError, subprocess.SubprocessError) as error:
        lines = str(error).strip().splitlines() or [type(error).__name__]
        return None, f"the kernel did not build or load: {lines[-1][:200]}"
    entry = handle.spectool_few_rows
    entry.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_int]
    entry.restype = None
    return entry, ""


def _built(compiler: str) -> Path:
    """The shared library for this source, compiler and CPU: from the cache, else compiled into it atomically."""
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(FLAGS).encode(), cpu_name().encode()]))
    library = cache_dir() / "native" / f"few_rows-{key.hexdigest()[:16]}.so"
    if library.is_file():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    staging = library.with_name(f".{library.name}.tmp-{os.getpid()}")
    try:
        done = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", str(staging)], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise OSError(done.stderr or f"{compiler} exited with {done.returncode}")
        os.replace(staging, library)  # another process may have raced us to the same file: either copy is whole
    finally:
        staging.unlink(missing_ok=True)
    return library
