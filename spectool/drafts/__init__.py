"""The draft families as transformers models, and ``build_draft`` to make one of a registered method for a target.

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
from .eagle1 import EagleDraftConfig, LlamaEagleDraftModel
from .eagle3 import (
    Eagle3DraftConfig,
    Eagle3Output,
    Eagle3TTTOutput,
    GptOssEagle3DraftModel,
    LlamaEagle3DraftModel,
)


def build_draft(
    method: str,
    target_config: Any,
    *,
    target_layer_ids: Sequence[int] | None,
    num_draft_layers: int | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    **options: Any,
) -> PreTrainedModel:
    """A freshly initialised draft of ``method`` (a registered method's name) for a target config.

    Defaults: one layer for eagle1/eagle3 (the EAGLE-3 format allows only one); dflash/dspark one layer per
    feature layer (5 with the upstream ids); block size 16 (dflash) / 7 (dspark); the mask token is the target's
    first unused embedding row when known (Qwen3), otherwise a ``SpectoolError`` asks for --mask-token-id.
    ``target_layer_ids`` are output-of-layer ids (eagle1 uses the last hidden state: pass None or [N-1]).
    ``options`` are the method's shape options (`DraftMethod.options`; another method's are refused when given) and
    overrides of the draft's own config (e.g. ``num_attention_heads``, ``intermediate_size``, or ``hidden_size`` for
    eagle3) where the method allows.
    ``device="meta"`` builds without allocating (for
    counting parameters). Weights copied from the target (EAGLE-1 embeddings, DSpark embeddings and lm_head)
    are left to the method's ``copy_target_tensors``.
    """
    from spectool.registry import declared_options, get

    found = get(method)
    shape_names = declared_options("shape")
    shape = {name: value for name, value in options.items() if name in shape_names}
    config_overrides = {name: value for name, value in options.items() if name not in shape_names}
    for option, value in shape.items():
        found.check_option(option, value)
    if num_draft_layers is not None and num_draft_layers < 1:
        raise UsageError(f"num_draft_layers must be at least 1, got {num_draft_layers}")
    n = int(text_config(target_config).num_hidden_layers)
    ids = None if target_layer_ids is None else list(target_layer_ids)
    if not found.reads_feature_layers and ids not in (None, [n - 1]):
        raise UsageError(f"{method} reads only the target's last hidden state (id {n - 1}); got {target_layer_ids}")
    if found.reads_feature_layers and ids is not None:
        with warnings.catch_warnings():
            # Ids an engine cannot capture are legal here; warning about them is the caller's (registry's) job.
            warnings.simplefilter("ignore", LayerIdWarning)
            ids = validate_layer_ids(ids, n, expected_count=found.fixed_feature_count, method=method)
    options = {**shape, "num_draft_layers": num_draft_layers, "overrides": config_overrides}
    config = found.build_config(target_config, ids, options)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = found.model_class(config)(config)
    if dtype is not None:
        model = model.to(dtype)
    model.freeze_target_copies()
    return model


__all__ = [
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
    "teacher_forced_prev_tokens",
]
