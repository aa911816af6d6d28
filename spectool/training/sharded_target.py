"""`train --shard-target`: the frozen target built sharded, so no process ever holds all of it.

The model is built on the meta device (no memory), its decoder layers are sharded with FSDP2 (`distributed.
shard_frozen_target`), and only then is memory allocated: each process's 1/N of every layer, plus the parts kept
whole (embedding, final norm, lm_head). The weights are read from the safetensors files one tensor at a time,
and of a sharded one only this process's rows (FSDP2 cuts dim 0 as `torch.chunk` does), so peak memory per
process is its share of the target plus the largest tensor kept whole. Buffers that are computed
rather than stored (the rotary inverse frequencies) are computed again on the real device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectool.errors import SpectoolError
from spectool.hub import TargetInfo, load_tokenizer, model_directory, weight_index
from spectool.training.distributed import DistributedContext, shard_frozen_target


def load_sharded_target(info: TargetInfo, *, dtype: str, context: DistributedContext) -> tuple[Any, Any, int, int]:
    """(model, tokenizer, bytes this process keeps, bytes of the whole target), the model's decoder layers
    sharded over the processes and every weight read from the target's safetensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = model_directory(info)
    tokenizer = load_tokenizer(info, directory)
    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    kept, whole = shard_frozen_target(model, context)
    model.to_empty(device=context.device)
    _read_weights(model, Path(directory), info.ref)
    _recompute_rotary(model, context.device)
    model.eval().requires_grad_(False)
    return model, tokenizer, kept, whole


def _weight_files(directory: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file holding it (`hub.weight_index`)."""
    if not (directory / "model.safetensors").is_file() and not (directory / "model.safetensors.index.json").is_file():
        raise SpectoolError(f"{directory} holds no safetensors weights; --shard-target reads them tensor by tensor")
    return {key: directory / name for key, name in weight_index(directory.__truediv__).items()}


@torch.no_grad()
def _read_weights(model: nn.Module, directory: Path, ref: str) -> None:
    """Copy each parameter's rows from the checkpoint (a sharded one: only this process's rows)."""
    from safetensors import safe_open

    files = _weight_files(directory)
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, param in model.named_parameters(remove_duplicate=True):
        if name not in files:
            if tied and name.endswith("lm_head.weight"):
                continue  # the embedding, tied below
            raise SpectoolError(f"{ref}: the checkpoint has no {name}; train without --shard-target")
        # one file mapping per tensor: the pages read leave this process with it (a mapping kept open keeps every
        # page read in its resident memory)
        with safe_open(str(files[name]), framework="pt") as handle:
            stored = handle.get_slice(name)
            if hasattr(param, "to_local"):  # sharded: only this process's rows of dim 0, cut as torch.chunk cuts
                target = param.to_local()
                rows = stored.get_shape()[0]
                per = -(-rows // param.device_mesh.size())
                start = min(rows, param.device_mesh.get_local_rank() * per)
                values = stored[start : min(rows, start + per)]
            else:
                target, values = param, stored[:]
        if tuple(values.shape) != tuple(target.shape):
            raise SpectoolError(
                f"{ref}: {name} reads as {tuple(values.shape)} from the checkpoint, {tuple(target.shape)} here"
            )
        target.copy_(values.to(target.dtype))
    if tied:
        model.tie_weights()


def _recompute_rotary(model: nn.Module, device: torch.device) -> None:
    """Rotary embeddings keep computed (not stored) inverse frequencies: build each again, off the meta device."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if "inv_freq" in dict(child.named_buffers(recurse=False)) and hasattr(child, "config"):
                setattr(parent, child_name, type(child)(child.config).to(device))
