"""The machine's limit for one decoding step: a target step must read every weight it multiplies by, so its time is
at least (bytes read) / (memory bandwidth). `bench --profile` states that floor beside the measured step.

`memory_bandwidth` measures what this process reads per second from a buffer much larger than the caches (best of a
few passes, the threads torch uses now); `step_weight_bytes` counts the bytes of weights one step reads (every
parameter once, a tied embedding once as the lm_head, an untied input embedding not at all: a step reads one row).
KV-cache reads are left out: for the short contexts of a bench they are a small fraction.
"""

from __future__ import annotations

import time

import torch
from torch import nn

#: Bytes of the buffer read to measure bandwidth: well past any CPU cache, small enough to allocate anywhere.
BANDWIDTH_BUFFER_BYTES = 512 * 2**20


def memory_bandwidth(device: torch.device | str = "cpu", *, passes: int = 5) -> float:
    """Bytes per second one full read of a large float32 buffer reaches (the best of `passes`)."""
    device = torch.device(device)
    buffer = torch.ones(BANDWIDTH_BUFFER_BYTES // 4, dtype=torch.float32, device=device)
    buffer.sum()  # first touch and warm-up
    best = float("inf")
    for _ in range(passes):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        buffer.sum()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    del buffer
    return BANDWIDTH_BUFFER_BYTES / best


def step_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decoding step of `model` reads: each parameter once (shared tensors once), without the
    input embedding unless it is tied to the output head (then it is read whole, as the lm_head)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embedding.data_ptr()
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if parameter.data_ptr() in seen:
            continue
        seen.add(parameter.data_ptr())
        if parameter.data_ptr() == embedding.data_ptr() and not tied:
            continue
        total += parameter.numel() * parameter.element_size()
    return total
