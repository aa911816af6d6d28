"""The draft a run trains: a fresh one (`spectool.drafts.from_target.new_draft`), the one ``--init`` names, or
the checkpoint a resumed run continues from, with its spec resolved for the target and, for an EAGLE-3 draft with
a pruned vocabulary, that vocabulary built from the training data."""

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
from spectool.registry import DraftSpec, resolve
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
            target_layer_ids=ids if config.method != "eagle1" else None,
            block_size=config.block_size,
            mask_token_id=config.mask_token_id,
            draft_vocab_size=config.draft_vocab_size,
            markov_rank=config.markov_rank,
        )
        draft = new_draft(info, spec, seed=config.seed)
    if resume_from is None and getattr(draft, "pruned_vocab", False):
        if source is None or not bool(draft.d2t.any()):  # d2t all zero: the placeholder `spectool init` writes
            notes.append(_prune_vocab(draft, train_examples, target_lm_head))
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
        num_draft_layers=spec.num_draft_layers if config.method != "eagle3" else None,
        block_size=spec.block_size,
        mask_token_id=spec.mask_token_id,
        draft_vocab_size=spec.draft_vocab_size,
        markov_rank=spec.markov_rank,
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
    spec = _resolve(
        config,
        info,
        notes if config.target_layer_ids is not None and not resumed else None,
        target_layer_ids=ids if config.method != "eagle1" else None,
        num_feature_layers=len(ids) if ids and config.method in ("dflash", "dspark") else None,
        num_draft_layers=cfg.num_hidden_layers,
        block_size=getattr(cfg, "block_size", None),
        mask_token_id=getattr(cfg, "mask_token_id", None),
        draft_vocab_size=getattr(cfg, "draft_vocab_size", None),
        markov_rank=getattr(cfg, "markov_rank", None),
    )
    return loaded.model, spec


def _resolve(config: TrainConfig, info: TargetInfo, notes: list[str] | None, **options: Any) -> DraftSpec:
    """`spectool.registry.resolve` for this target; layer-id warnings become ``notes`` (None: dropped)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LayerIdWarning)
        spec = resolve(config.method, info.arch, tokenizer_length=info.tokenizer_length, **options)
    for warning in caught:
        if not issubclass(warning.category, LayerIdWarning):
            warnings.warn(warning.message, warning.category, stacklevel=2)
        elif notes is not None:
            notes.append(str(warning.message))
    return spec


def _prune_vocab(draft: nn.Module, train_examples: list[Any], target_lm_head: nn.Module) -> str:
    """EAGLE-3 with a pruned vocabulary: keep the most frequent supervised tokens of the training split; returns
    the note saying how much of the supervision they cover."""
    from spectool.training.objectives.eagle3 import build_draft_vocab, count_supervised_tokens

    counts = count_supervised_tokens(train_examples, draft.config.vocab_size)
    draft.set_vocab_mapping(build_draft_vocab(counts, draft.config.draft_vocab_size))
    if not draft.owns_embeddings:
        draft.init_lm_head_from_target(target_lm_head.weight.detach().float().cpu())
    kept = int(counts[draft.draft_to_target(torch.arange(draft.config.draft_vocab_size))].sum())
    share = kept / max(1, int(counts.sum()))
    return (
        f"draft vocabulary: the {draft.config.draft_vocab_size} most frequent supervised tokens "
        f"({share:.1%} of the supervised tokens)"
    )
