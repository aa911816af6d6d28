"""Initialise a draft for a target: resolve the spec, build the draft, copy what the format stores, save it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from spectool.checkpoint import save_draft
from spectool.drafts.from_target import new_draft, target_metadata
from spectool.hub import TargetInfo, resolve_model
from spectool.layers import unportable_ids
from spectool.paths import refuse_to_replace_input
from spectool.registry import DraftSpec, get, resolve_quietly, serving


@dataclass
class InitResult:
    """What `init_draft` wrote: the draft directory, its resolved spec, its target, parameter counts and notes."""

    path: Path
    spec: DraftSpec
    target_ref: str
    trainable_params: int
    frozen_params: int
    notes: list[str] = field(default_factory=list)


def init_draft(
    model: str | TargetInfo,
    method: str,
    out: str | Path,
    *,
    revision: str | None = None,
    seed: int = 0,
    dtype: str = "bfloat16",
    **options,
) -> InitResult:
    """Resolve MODEL (or take it resolved), build a draft of `method` and write it to `out` (atomically)."""
    info = model if isinstance(model, TargetInfo) else resolve_model(model, revision=revision)
    if info.directory is not None:
        refuse_to_replace_input(out, info.directory, "MODEL")
    # The layer-id warning is said once, as a note below.
    spec = resolve_quietly(
        method, info.arch, tokenizer_length=info.tokenizer_length, unused_token_id=info.unused_token_id, **options
    )
    draft = new_draft(info, spec, seed=seed)
    notes = list(info.notes)
    if get(method).reads_feature_layers and unportable_ids(spec.target_layer_ids, spec.num_target_layers):
        notes.append(serving(spec.method, spec.target_layer_ids, spec.num_target_layers).message())
    notes += get(method).notes(spec, initialised=True)
    path = save_draft(draft, out, method=spec.method, metadata=target_metadata(info, spec), dtype=getattr(torch, dtype))
    frozen = set(draft.frozen_parameter_names())
    counts = {True: 0, False: 0}
    for name, param in draft.named_parameters():
        counts[name in frozen] += param.numel()
    return InitResult(path, spec, info.ref, counts[False], counts[True], notes)
