"""spectool's native kernels (native.c): built once per machine with its C compiler, called through ctypes.

* `few_rows`: fp32 token rows times a row-major weight, the weight read once per call and prefetched far enough
  ahead that eight rows cost little more than one (BLAS spends 2-3x longer there on CPUs); each token's result is
  bit-identical whatever the number of rows beside it. One more form the kernel planner times (`kernels.FORMS`).
  `few_rows_bf16` reads a bfloat16 copy instead: a draft saved in bf16 keeps its exact weights in half the bytes.
* `rms_norm`, `rotary_store` and `attention`: the lean forward's per-layer glue (an RMSNorm is ~8 small torch
  ops; the rotary embedding and the two cache writes ~8 more; attention over a few new tokens, with its
  transposes, ~5), one call each, where the products run natively too.

Building needs a C compiler with OpenMP (``$CC``, else ``cc``): the shared library is compiled with
``-O3 -march=native -ffp-contract=off -fopenmp`` into spectool's cache dir, keyed by the source, the compiler and
the CPU, so it is built once (about a second) and reused. Where no compiler works spectool simply does without
it; `unavailable_reason()` says why (bench --profile prints it). The wrappers check every shape, stride and dtype
before handing pointers to C.
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

SOURCE = Path(__file__).with_name("native.c")
#: -ffp-contract=off: no multiply-add is fused in one tile shape and not in another (each token's sum stays the same)
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
VERSION = 4  # what spectool_native_version() returns for this source

_loaded: tuple[ctypes.CDLL | None, str] | None = None  # (the library or None, why not) once looked up


def library() -> ctypes.CDLL | None:
    """The compiled library, built (or found in the cache) on first use; None where it cannot be."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded[0]


def unavailable_reason() -> str:
    """Why `library()` is None ('' when it is not)."""
    library()
    return _loaded[1]


def _required() -> ctypes.CDLL:
    handle = library()
    if handle is None:
        raise RuntimeError(f"the native kernels are not available: {unavailable_reason()}")
    return handle


def _check_float32(*tensors: torch.Tensor) -> None:
    if not all(t.dtype == torch.float32 and t.is_cpu for t in tensors):
        raise ValueError("the native kernels take float32 CPU tensors")


def few_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x` [..., in] @ `weight` [out, in].T -> [..., out] by the native kernel: contiguous float32 CPU tensors."""
    handle = _required()
    _check_float32(x, weight)
    if not (x.is_contiguous() and weight.is_contiguous()):
        raise ValueError("the native kernel multiplies contiguous float32 tensors")
    return _product(handle.spectool_few_rows, x, weight)


def few_rows_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`few_rows` reading a bfloat16 `weight` [out, in] (widened exactly as it is read): half the bytes, and the
    same result, bit for bit, as `few_rows` on its float32 copy. `x` stays float32."""
    handle = _required()
    _check_float32(x)
    if weight.dtype != torch.bfloat16 or not weight.is_cpu or not (x.is_contiguous() and weight.is_contiguous()):
        raise ValueError("the native bf16 kernel multiplies contiguous float32 rows by a contiguous bfloat16 weight")
    return _product(handle.spectool_few_rows_bf16, x, weight)


def _product(entry, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x` [..., in] times `weight` [out, in] transposed by a product entry point (dtypes and layout checked)."""
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"the native kernel cannot multiply {tuple(x.shape)} by {tuple(weight.shape)}.T")
    out = torch.empty((*x.shape[:-1], weight.shape[0]))
    width = weight.shape[1]
    rows = x.numel() // width if width else 0
    if rows and weight.shape[0]:
        entry(x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, weight.shape[0], width, torch.get_num_threads())
    elif weight.shape[0]:
        out.zero_()  # no inputs to sum over (in = 0)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """transformers' RMSNorm of `x` [..., width] (float32, contiguous), scaled by `weight` [width] unless None."""
    handle = _required()
    _check_float32(x, *([weight] if weight is not None else []))
    width = x.shape[-1]
    if not x.is_contiguous() or (weight is not None and (weight.shape != (width,) or not weight.is_contiguous())):
        raise ValueError(f"the native RMSNorm cannot normalise {tuple(x.shape)} by a weight of another width")
    out = torch.empty(x.shape)
    rows = x.numel() // width if width else 0
    if rows:
        scale = weight.data_ptr() if weight is not None else None
        handle.spectool_rms_norm(x.data_ptr(), scale, out.data_ptr(), rows, width, eps)
    return out


def rotary_store(
    qk: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    start: int,
) -> torch.Tensor:
    """Rotate the queries and keys of n new tokens and write keys and values into batch row 0 of the caches.

    `qk` [1, n, heads + kv_heads, d] and `v` [1, n, kv_heads, d] (views of one projection are fine: each head's d
    floats contiguous), `cos` / `sin` [n, d] the tokens' rotary rows, `keys` / `values` [B, kv_heads, capacity, d]
    contiguous, positions start .. start + n - 1 written. Returns the rotated queries [1, heads, n, d]."""
    handle = _required()
    _check_float32(qk, v, cos, sin, keys, values)
    if qk.dim() != 4 or keys.dim() != 4:
        raise ValueError("the native rotary takes [1, n, heads, d] queries/keys and [B, heads, capacity, d] caches")
    _, n, both, d = qk.shape
    kv_heads, capacity = keys.shape[1], keys.shape[2]
    heads = both - kv_heads
    fits = (
        qk.shape[0] == 1
        and v.shape == (1, n, kv_heads, d)
        and qk.stride()[2:] == (d, 1)
        and v.stride()[2:] == (d, 1)
        and cos.shape == sin.shape == (n, d)
        and cos.is_contiguous()
        and sin.is_contiguous()
        and _caches_fit(keys, values, d)
        and heads > 0
        and d % 2 == 0
        and 0 <= start
        and start + n <= capacity
    )
    if not fits:
        raise ValueError(
            f"the native rotary cannot take queries/keys {tuple(qk.shape)}, values {tuple(v.shape)}, tables "
            f"{tuple(cos.shape)} and caches {tuple(keys.shape)} at position {start}"
        )
    q = torch.empty(1, heads, n, d)
    handle.spectool_rotary_store(
        qk.data_ptr(), qk.stride(1), v.data_ptr(), v.stride(1), cos.data_ptr(), sin.data_ptr(), n, heads, kv_heads, d,
        q.data_ptr(), keys.data_ptr(), values.data_ptr(), capacity, start,
    )  # fmt: skip
    return q


def attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, length: int, scale: float
) -> torch.Tensor:
    """Softmax attention of queries `q` [1, heads, n, d] over the first `length` positions of batch row 0 of the
    caches `keys` / `values` [B, kv_heads, capacity, d] (grouped: heads a multiple of kv_heads), `mask` None (all
    seen) or boolean [n, length] (True: seen; any leading size-1 dimensions). Returns [1, n, heads * d]. Each
    query is computed alone (made for a few queries: a long prompt goes through torch's attention)."""
    handle = _required()
    _check_float32(q, keys, values)
    if q.dim() != 4 or keys.dim() != 4:
        raise ValueError("the native attention takes [1, heads, n, d] queries and [B, heads, capacity, d] caches")
    _, heads, n, d = q.shape
    kv_heads, capacity = keys.shape[1], keys.shape[2]
    if mask is not None and mask.dim() >= 2 and mask.numel() == n * length:
        mask = mask.reshape(mask.shape[-2:]).contiguous()
    fits = (
        q.shape[0] == 1
        and q.is_contiguous()
        and _caches_fit(keys, values, d)
        and kv_heads > 0
        and heads % kv_heads == 0
        and 0 < length <= capacity
        and (mask is None or (mask.dtype == torch.bool and mask.shape == (n, length) and mask.is_contiguous()))
    )
    if not fits:
        raise ValueError(
            f"the native attention cannot take queries {tuple(q.shape)}, caches {tuple(keys.shape)}, "
            f"{length} positions and mask {None if mask is None else tuple(mask.shape)}"
        )
    out = torch.empty(1, n, heads * d)
    handle.spectool_attention(
        q.data_ptr(), keys.data_ptr(), values.data_ptr(), None if mask is None else mask.data_ptr(), out.data_ptr(),
        n, heads, kv_heads, d, length, capacity, scale,
    )  # fmt: skip
    return out


def _caches_fit(keys: torch.Tensor, values: torch.Tensor, d: int) -> bool:
    """Whether `keys` / `values` are one contiguous [B, heads, capacity, d] cache pair (4-d checked by the caller)."""
    return keys.shape == values.shape and keys.shape[3] == d and keys.is_contiguous() and values.is_contiguous()


def _load() -> tuple[ctypes.CDLL | None, str]:
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        return None, f"no C compiler ({os.environ.get('CC') or 'cc'}) on PATH"
    try:
        built = _built(compiler)
        try:
            handle = ctypes.CDLL(str(built))
        except OSError:  # a damaged file in the cache: built again, once
            built.unlink(missing_ok=True)
            handle = ctypes.CDLL(str(_built(compiler)))
        if handle.spectool_native_version() != VERSION:
            return None, f"{built} is another build of the kernels"
    except (OSError, AttributeError, subprocess.SubprocessError) as error:
        lines = str(error).strip().splitlines() or [type(error).__name__]
        return None, f"the kernels did not build or load: {lines[-1][:200]}"
    pointer, long = ctypes.c_void_p, ctypes.c_long
    handle.spectool_few_rows.argtypes = [pointer] * 3 + [long] * 3 + [ctypes.c_int]
    handle.spectool_few_rows_bf16.argtypes = [pointer] * 3 + [long] * 3 + [ctypes.c_int]
    handle.spectool_rms_norm.argtypes = [pointer] * 3 + [long] * 2 + [ctypes.c_float]
    handle.spectool_rotary_store.argtypes = (
        [pointer, long, pointer, long, pointer, pointer] + [long] * 4 + [pointer] * 3 + [long] * 2
    )
    handle.spectool_attention.argtypes = [pointer] * 5 + [long] * 6 + [ctypes.c_float]
    names = ("spectool_few_rows", "spectool_few_rows_bf16", "spectool_rms_norm", "spectool_rotary_store")
    for name in (*names, "spectool_attention"):
        getattr(handle, name).restype = None
    return handle, ""


def _built(compiler: str) -> Path:
    """The shared library for this source, compiler and CPU: from the cache, else compiled into it atomically."""
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(FLAGS).encode(), cpu_name().encode()]))
    built = cache_dir() / "native" / f"spectool-{key.hexdigest()[:16]}.so"
    if built.is_file():
        return built
    built.parent.mkdir(parents=True, exist_ok=True)
    staging = built.with_name(f".{built.name}.tmp-{os.getpid()}")
    try:
        done = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", str(staging), "-lm"], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise OSError(done.stderr or f"{compiler} exited with {done.returncode}")
        os.replace(staging, built)  # another process may have raced us to the same file: either copy is whole
    finally:
        staging.unlink(missing_ok=True)
    return built
