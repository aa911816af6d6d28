"""The four draft families as transformers models, and ``build_draft`` to make one for a target.

| method | class | config | width (hidden_size) | heads / kv heads / head_dim / intermediate |
|---|---|---|---|---|
| eagle1 | LlamaEagleDraftModel | EagleDraftConfig | = target H (regresses target features) | may differ |
| eagle3 | LlamaEagle3DraftModel (GptOssEagle3DraftModel for gpt-oss) | Eagle3DraftConfig | may differ (then owns its embeddings) | may differ |
| dflash | Qwen3DFlashDraftModel | DFlashDraftConfig | = target H (target embeddings and lm_head) | may differ |
| dspark | Qwen3DSparkModel | DSparkDraftConfig | = target H (copies of the target's) | may differ |

Frozen parameters (copies of the target's, never trained): EAGLE-1 ``embed_tokens``; DSpark ``embed_tokens`` and
``lm_head``. ``draft.trainable_parameter_names()`` / ``draft.frozen_parameter_names()`` list them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from spectool.errors import UsageError
from spectool.layers import LayerIdWarning, validate_layer_ids

from .common import DraftKVCache, text_config
from .dflash import (
    DFlashDraftConfig,
    Qwen3DFlashDraftModel,
    block_input_ids,
    block_position_ids,
    build_block_attention_mask,
    default_mask_token_id,
)
from .dspark import DSparkBlockDraft, DSparkDraftConfig, Qwen3DSparkModel, teacher_forced_prev_tokens
from .eagle import EagleDraftConfig, LlamaEagleDraftModel
from .eagle3 import (
    Eagle3DraftConfig,
    Eagle3Output,
    Eagle3TTTOutput,
    GptOssEagle3DraftModel,
    LlamaEagle3DraftModel,
)

METHODS = ("eagle1", "eagle3", "dflash", "dspark")

DRAFT_CLASSES: dict[str, type[PreTrainedModel]] = {
    "eagle1": LlamaEagleDraftModel,
    "eagle3": LlamaEagle3DraftModel,
    "dflash": Qwen3DFlashDraftModel,
    "dspark": Qwen3DSparkModel,
}

DRAFT_CONFIG_CLASSES = {
    "eagle1": EagleDraftConfig,
    "eagle3": Eagle3DraftConfig,
    "dflash": DFlashDraftConfig,
    "dspark": DSparkDraftConfig,
}

UPSTREAM_BLOCK_SIZE = {"dflash": 16, "dspark": 7}


def is_gpt_oss(target_config: Any) -> bool:
    cfg = text_config(target_config)
    architectures = getattr(target_config, "architectures", None) or getattr(cfg, "architectures", None) or []
    return getattr(cfg, "model_type", None) == "gpt_oss" or "GptOssForCausalLM" in architectures


def draft_class_for(method: str, target_config: Any) -> type[PreTrainedModel]:
    """The draft class of ``method`` for this target (gpt-oss targets get the YaRN EAGLE-3 variant)."""
    if method not in DRAFT_CLASSES:
        raise UsageError(f"unknown draft method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "eagle3" and is_gpt_oss(target_config):
        return GptOssEagle3DraftModel
    return DRAFT_CLASSES[method]


def build_draft(
    method: str,
    target_config: Any,
    *,
    target_layer_ids: Sequence[int] | None,
    num_draft_layers: int | None = None,
    block_size: int | None = None,
    mask_token_id: int | None = None,
    draft_vocab_size: int | None = None,
    markov_rank: int = 256,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    **config_overrides: Any,
) -> PreTrainedModel:
    """A freshly initialised draft of ``method`` ("eagle1", "eagle3", "dflash", "dspark") for a target config.

    Defaults: one layer for eagle1/eagle3 (the EAGLE-3 format allows only one); dflash/dspark one layer per
    feature layer (5 with the upstream ids); block size 16 (dflash) / 7 (dspark); the mask token is the target's
    first unused embedding row when known (Qwen3), otherwise a ``SpectoolError`` asks for --mask-token-id.
    ``target_layer_ids`` are output-of-layer ids (eagle1 uses the last hidden state: pass None or [N-1]).
    ``config_overrides`` change the draft's own shape (e.g. ``num_attention_heads``, ``intermediate_size``, or
    ``hidden_size`` for eagle3) where the method allows. ``device="meta"`` builds without allocating (for
    counting parameters). Weights copied from the target (EAGLE-1 embeddings, DSpark embeddings and lm_head)
    are left to ``copy_target_embeddings`` / ``copy_target_weights``.
    """
    cls = draft_class_for(method, target_config)
    num_target_layers = int(text_config(target_config).num_hidden_layers)
    if draft_vocab_size is not None and method != "eagle3":
        raise UsageError("draft_vocab_size (vocabulary pruning) applies to eagle3 only")
    if num_draft_layers is not None and num_draft_layers < 1:
        raise UsageError(f"num_draft_layers must be at least 1, got {num_draft_layers}")
    if method == "eagle1":
        if target_layer_ids not in (None, [num_target_layers - 1], (num_target_layers - 1,)):
            raise UsageError(
                f"eagle1 reads only the target's last hidden state (id {num_target_layers - 1}); got {target_layer_ids}"
            )
        config = EagleDraftConfig.from_target(target_config, num_draft_layers=num_draft_layers or 1, **config_overrides)
    else:
        if target_layer_ids is None:
            raise UsageError(f"{method} needs target_layer_ids")
        with warnings.catch_warnings():
            # Ids an engine cannot capture are legal here; warning about them is the caller's (registry's) job.
            warnings.simplefilter("ignore", LayerIdWarning)
            ids = validate_layer_ids(
                list(target_layer_ids),
                num_target_layers,
                expected_count=3 if method == "eagle3" else None,
                method=method,
            )
        if method == "eagle3":
            if num_draft_layers not in (None, 1):
                raise UsageError("the EAGLE-3 format holds exactly one decoder layer; drop --num-draft-layers")
            config = Eagle3DraftConfig.from_target(
                target_config, target_layer_ids=ids, draft_vocab_size=draft_vocab_size, **config_overrides
            )
        else:
            config_cls = DFlashDraftConfig if method == "dflash" else DSparkDraftConfig
            extra = {"markov_rank": markov_rank} if method == "dspark" else {}
            config = config_cls.from_target(
                target_config,
                target_layer_ids=ids,
                num_draft_layers=num_draft_layers,
                block_size=block_size or UPSTREAM_BLOCK_SIZE[method],
                mask_token_id=mask_token_id,
                **extra,
                **config_overrides,
            )
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = cls(config)
    if dtype is not None:
        model = model.to(dtype)
    model.freeze_target_copies()
    return model


__all__ = [
    "DRAFT_CLASSES",
    "DRAFT_CONFIG_CLASSES",
    "METHODS",
    "DFlashDraftConfig",
    "DSparkBlockDraft",
    "DSparkDraftConfig",
    "DraftKVCache",
    "Eagle3DraftConfig",
    "Eagle3Output",
    "Eagle3TTTOutput",
    "EagleDraftConfig",
    "GptOssEagle3DraftModel",
    "LlamaEagle3DraftModel",
    "LlamaEagleDraftModel",
    "Qwen3DFlashDraftModel",
    "Qwen3DSparkModel",
    "block_input_ids",
    "block_position_ids",
    "build_block_attention_mask",
    "build_draft",
    "default_mask_token_id",
    "draft_class_for",
    "teacher_forced_prev_tokens",
]
