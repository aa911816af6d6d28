"""What a training run reads before it trains: the frozen target (the whole model online; with stored features
only its lm_head and input embedding) and the tokenized examples, split into training and held-out rows."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from spectool import hardware
from spectool.errors import SpectoolError, UsageError
from spectool.hub import TargetInfo
from spectool.training.batches import pad_token_id, split_heldout
from spectool.training.capture import prepare_examples
from spectool.training.config import TrainConfig
from spectool.training.distributed import DistributedContext
from spectool.training.features import FeatureStore


@dataclass
class TrainingInputs:
    """The target and the examples of a run.

    ``config`` is the run's configuration with --max-length capped to the target's positions; ``target_model`` is
    None when training from stored features (``store``); ``data_report`` says what reading the data found.
    """

    config: TrainConfig
    info: TargetInfo
    store: FeatureStore | None
    target_dtype: str
    target_model: Any
    target_lm_head: nn.Module
    target_embed: nn.Module
    examples: list[Any]
    pad_id: int
    data_report: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def load_inputs(config: TrainConfig, device: torch.device, context: DistributedContext | None = None) -> TrainingInputs:
    """Resolve and load the target (or open the feature store) and tokenize the data for ``config``; with
    ``config.shard_target``, the target is built sharded over ``context``'s processes (`sharded_target`)."""
    from spectool.hub import load_model_and_tokenizer, resolve_model

    store = FeatureStore(config.features) if config.features else None
    if store is not None and config.shard_target:
        raise UsageError("--shard-target shards the target's forward; with --features the target does not run")
    info = resolve_model(config.target or (store.manifest["target"] if store else None))
    target_dtype = hardware.target_dtype(device, config.dtype)
    notes: list[str] = []
    limit = info.arch.max_position_embeddings
    if store is None and limit and config.max_length > limit:
        notes.append(
            f"--max-length {config.max_length} is more than the target's {limit} positions "
            f"(max_position_embeddings): examples are cut at {limit} tokens"
        )
        config = replace(config, max_length=limit)
    if store is not None:
        lm_head, embed = _target_heads(info, target_dtype, device)
        return TrainingInputs(
            config,
            info,
            store,
            target_dtype,
            None,
            lm_head,
            embed,
            store.examples,
            int(store.manifest["pad_token_id"]),
            {"features": str(store.directory)},
            notes,
        )
    if config.shard_target:
        from spectool.training.sharded_target import load_sharded_target

        model, tokenizer, kept, whole = load_sharded_target(
            info, dtype=target_dtype, context=context or DistributedContext()
        )
        notes.append(
            f"target sharded over {context.world_size} processes: each keeps {kept / 2**20:.1f} MiB of its "
            f"{whole / 2**20:.1f} MiB (the embedding and lm_head whole)"
        )
    else:
        model, tokenizer = load_model_and_tokenizer(info, dtype=target_dtype, device=str(device))
    prepared = prepare_examples(config, tokenizer)
    data_report = {
        "rows_read": prepared.load_report.rows_read,
        "rows_skipped": prepared.load_report.rows_skipped + prepared.tokenize_report.rows_skipped,
        "skip_reasons": prepared.load_report.reasons + prepared.tokenize_report.reasons,
        "truncated": prepared.tokenize_report.truncated,
        "dropped_unsupervised": prepared.tokenize_report.dropped_unsupervised,
    }
    return TrainingInputs(
        config,
        info,
        None,
        target_dtype,
        model,
        model.get_output_embeddings(),
        model.get_input_embeddings(),
        prepared.examples,
        pad_token_id(tokenizer),
        data_report,
        notes,
    )


def _target_heads(info: TargetInfo, dtype: str, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """The target's lm_head and input embedding alone, read from its weights (training from features). A tied
    lm_head is the embedding: one tensor, cast once, serves both."""
    from spectool.hub import read_target_weights

    weights = read_target_weights(info)
    embed_weight = weights["embed_tokens"].to(device=device, dtype=getattr(torch, dtype))
    if weights["lm_head"] is weights["embed_tokens"]:
        head_weight = embed_weight
    else:
        head_weight = weights["lm_head"].to(device=device, dtype=getattr(torch, dtype))
    del weights
    embed = nn.Embedding.from_pretrained(embed_weight, freeze=True)
    head = nn.Linear(head_weight.shape[1], head_weight.shape[0], bias=False, device="meta")  # no random init
    head.weight = nn.Parameter(head_weight, requires_grad=False)
    return head, embed


def share_target_copies(draft: nn.Module, lm_head: nn.Module, embed: nn.Module) -> int:
    """Point the draft's frozen copies of the target's lm_head / input embedding (DSpark keeps both, EAGLE-1 the
    embedding) at the target's own tensors where they hold the same values, so a run keeps one copy instead of
    two; returns the bytes freed. A copy is left alone when another of the draft's tensors already shares the
    target's (a tied target: the checkpoint must not hold two names for one tensor). Not for FSDP, which shards
    the draft's parameters in place."""
    theirs = {"embed_tokens.weight": embed.weight, "lm_head.weight": lm_head.weight}
    frozen = set(draft.frozen_parameter_names()) if hasattr(draft, "frozen_parameter_names") else set()
    shared: set[int] = set()
    freed = 0
    for name in sorted(frozen & set(theirs)):
        module_name, _, attribute = name.rpartition(".")
        module = draft.get_submodule(module_name)
        own, target = getattr(module, attribute), theirs[name].detach()
        same = own.shape == target.shape and own.dtype == target.dtype and own.device == target.device
        if not same or target.data_ptr() in shared or not torch.equal(own, target):
            continue
        setattr(module, attribute, nn.Parameter(target, requires_grad=False))
        shared.add(target.data_ptr())
        freed += own.numel() * own.element_size()
    return freed


@dataclass
class ExampleSplit:
    """The training and held-out examples, with their positions among all examples (the feature store's
    indices)."""

    train: list[Any]
    held_out: list[Any]
    train_index: list[int]
    held_out_index: list[int]


def split_examples(examples: list[Any], eval_fraction: float, *, seed: int) -> ExampleSplit:
    """Hold out ``eval_fraction`` of the examples (`split_heldout`); refused when no training example is left."""
    train, held_out = split_heldout(examples, eval_fraction, seed=seed)
    if not train:
        raise SpectoolError("no training examples left after holding out --eval-fraction; lower it")
    index_of = {id(example): index for index, example in enumerate(examples)}
    return ExampleSplit(
        train, held_out, [index_of[id(example)] for example in train], [index_of[id(example)] for example in held_out]
    )


def frozen_target(inputs: TrainingInputs, layer_ids: list[int]) -> Any:
    """The target wrapped to return the hidden states of ``layer_ids`` (None with stored features, which must hold
    those layers)."""
    store = inputs.store
    if store is None:
        from spectool.target import FrozenTarget

        return FrozenTarget(inputs.target_model, layer_ids)
    if store.target_layer_ids != layer_ids:
        raise UsageError(
            f"{store.directory} holds features of layers {store.target_layer_ids}, the draft reads "
            f"{layer_ids}; train with --target-layer-ids matching the features"
        )
    return None
