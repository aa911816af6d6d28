"""Device and precision choices, one home for decoding and training: which `--device` is usable here, which dtype
the frozen target runs in while training, and whether the draft trains under autocast.

The training target is only read (features and teacher logits, no gradient), so it runs in bfloat16 wherever the
hardware multiplies bfloat16 natively: on CUDA, and on x86 CPUs with AMX tiles (Intel Xeon since Sapphire Rapids),
where a bf16 matmul is several times faster than an fp32 one and the tiny target's forward takes half the time.
Elsewhere it stays float32. The trainable draft keeps fp32 weights; it runs under bf16 autocast on CUDA only (on CPU
the casts of its many small tensors cost more than they save). Decoding and `spectool data regen` are not affected:
they load the target in float32 on CPU.
"""

from __future__ import annotations

import platform

import torch

from spectool.errors import UsageError


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else the platform's processor string), or ""."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor()


def auto_device(device: str | None) -> str:
    """``device`` as given, or (None) cuda when available, else cpu; not checked (see `check_device`)."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def check_device(device: str | None) -> str:
    """`--device` as given (None: cuda when available, else cpu), refused with the fix when unusable here."""
    if device is None:
        return auto_device(device)
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type != "cpu":
        raise UsageError(f"--device {device}: only cpu and cuda are supported")
    return device


def cpu_multiplies_bf16() -> bool:
    """True on CPUs with AMX tiles (native bf16 matmul); False where torch cannot tell."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def target_dtype(device: torch.device, requested: str | None = "auto") -> str:
    """The training target's dtype for ``requested`` (auto / None, float32, bfloat16, float16) on ``device``."""
    if requested not in (None, "auto"):
        return requested
    if device.type == "cuda" or (device.type == "cpu" and cpu_multiplies_bf16()):
        return "bfloat16"
    return "float32"


def draft_autocast_dtype(device: torch.device, requested: str) -> torch.dtype | None:
    """bf16 autocast for the draft on CUDA (``auto``) or when asked; None (fp32) otherwise."""
    if requested == "bfloat16" or (requested == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
