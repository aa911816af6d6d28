"""The draft a run trains: a fresh one (`spectool.drafts.from_target.new_draft`), the one ``--init`` names, or
the checkpoint a resumed run continues from, with its spec resolved for the target and the data-dependent setup its
objective asks for (`Objective.prepare_draft`: e.g. EAGLE-3's pruned vocabulary built from the training data)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectool.checkpoint import check_against_target, load_draft
from spectool.drafts.from_target import new_draft
from spectool.errors import UsageError
from spectool.hub import TargetInfo
from spectool.layers import LayerIdWarning
from spectool.registry import DraftSpec, get, resolve
from spectool.training.config import TrainConfig


@dataclass
class DraftSetup:
    """The draft to train (on its device, in training mode, target copies frozen), its resolved spec, and notes
    for the start of the run."""

    draft: nn.Module
    spec: DraftSpec
    notes: list[str] = field(default_factory=list)


def setup_draft(
    config: TrainConfig,
    info: TargetInfo,
    *,
    resume_from: Path | None,
    stored_layer_ids: list[int] | None,
    train_examples: list[Any],
    target_lm_head: nn.Module,
    device: torch.device,
) -> DraftSetup:
    """Build or load the draft ``config`` asks for: the checkpoint ``resume_from``, else ``config.init``, else a
    fresh one; ``stored_layer_ids`` are the layers of stored features (the default when none are given)."""
    ids = config.target_layer_ids
    if ids is None and stored_layer_ids:
        ids = stored_layer_ids
    source = resume_from or (Path(config.init).expanduser() if config.init else None)
    method = get(config.method)
    notes: list[str] = []
    if source is not None:
        draft, spec = _load(config, info, source, resumed=resume_from is not None, notes=notes)
    else:
        spec = _resolve(
            config,
            info,
            notes if config.target_layer_ids is not None else None,
            num_feature_layers=config.num_feature_layers,
            num_draft_layers=config.num_draft_layers,
            target_layer_ids=ids if method.reads_feature_layers else None,
            **config.options_of("shape"),
        )
        draft = new_draft(info, spec, seed=config.seed)
    if resume_from is None:
        notes += method.objective_class().prepare_draft(draft, train_examples, target_lm_head, source is None)
    draft.to(device)
    draft.freeze_target_copies()
    draft.train()
    return DraftSetup(draft, spec, notes)


def resolved_config(config: TrainConfig, spec: DraftSpec, *, target: str, warmup_steps: int) -> TrainConfig:
    """``config`` with every default filled in from the resolved ``spec`` (train_config.json; what --resume
    continues)."""
    from spectool.training.reporting import resolve_report_to

    return replace(
        config,
        target=target if config.target is None else config.target,
        lr=config.peak_lr,
        warmup_steps=warmup_steps,
        target_layer_ids=list(spec.target_layer_ids),
        num_draft_layers=None if get(config.method).fixed_draft_layers else spec.num_draft_layers,
        method_options={**config.method_options, **spec.options},
        report_to=",".join(resolve_report_to(config.report_to)) or "none",
    )


def _load(
    config: TrainConfig, info: TargetInfo, source: Path, *, resumed: bool, notes: list[str]
) -> tuple[nn.Module, DraftSpec]:
    """The draft saved in ``source`` (--init, or the checkpoint to resume) and its spec for this target."""
    loaded = load_draft(source, dtype=torch.float32)
    if loaded.method != config.method:
        raise UsageError(f"{source} holds a {loaded.method} draft, not {config.method}")
    fit_warnings = check_against_target(loaded, info.arch, info.tokenizer_length)
    if not resumed:
        notes.extend(fit_warnings + loaded.notes)
    cfg = loaded.model.config
    ids = loaded.target_layer_ids or None
    method = get(config.method)
    spec = _resolve(
        config,
        info,
        notes if config.target_layer_ids is not None and not resumed else None,
        target_layer_ids=ids if method.reads_feature_layers else None,
        num_feature_layers=len(ids) if ids and method.fixed_feature_count is None else None,
        num_draft_layers=cfg.num_hidden_layers,
        **{option: getattr(cfg, option, None) for option in method.option_names("shape")},
    )
    return loaded.model, spec


def _resolve(config: TrainConfig, info: TargetInfo, notes: list[str] | None, **options: Any) -> DraftSpec:
    """`spectool.registry.resolve` for this target; layer-id warnings become ``notes`` (None: dropped)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LayerIdWarning)
        spec = resolve(
            config.method,
            info.arch,
            tokenizer_length=info.tokenizer_length,
            unused_token_id=info.unused_token_id,
            **options,
        )
    for warning in caught:
        if not issubclass(warning.category, LayerIdWarning):
            warnings.warn(warning.message, warning.category, stacklevel=2)
        elif notes is not None:
            notes.append(str(warning.message))
    return spec
