"""DFlash draft (arXiv 2602.06036): block diffusion over target features, z-lab layout.

The target's K captured layers are fused once: ``ctx = hidden_norm(fc(cat(f_1..f_K)))`` (fc: K*H -> H, no bias).
A block ``[anchor, MASK x (B-1)]``, embedded with the TARGET's embedding, runs through N_d Qwen3 decoder layers.
In every layer the queries come from the block only, while keys/values are ``cat(k/v_proj(ctx), k/v_proj(block))``
with the same projections; q/k are RMS-normed per head; rotary uses positions ``[context | block]`` for keys and
the trailing block positions for queries; attention is NOT causal. A final ``norm`` gives the draft hidden states,
which the caller turns into logits with the target's lm_head (the draft owns neither embedding nor lm_head). One
forward drafts B-1 tokens (slot k predicts x_{a+k}; slot 0 is the known anchor).

Training packs many blocks per sequence: the context is the whole sequence's features and each block sees
context keys strictly before its anchor plus its own block, nothing of other blocks (``build_block_attention_mask``).

On disk: ``layers.{i}.self_attn.{q,k,v,o}_proj.weight``, ``layers.{i}.self_attn.{q_norm,k_norm}.weight``,
``layers.{i}.mlp.{gate,up,down}_proj.weight``, ``layers.{i}.{input_layernorm,post_attention_layernorm}.weight``,
``fc.weight`` [H, K*H], ``hidden_norm.weight``, ``norm.weight``. config.json: a Qwen3 config with
``"architectures": ["DFlashDraftModel"]``, top-level ``block_size`` and ``num_target_layers``, and
``dflash_config: {block_size, mask_token_id, target_layer_ids}``; the PyPI ``dflash`` package loads it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel, Qwen3Config

from spectool.errors import SpectoolError

from .common import (
    AttentionProjections,
    DraftKVCache,
    DraftModelMixin,
    GatedMLP,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    attend,
    draft_fields_from_target,
    ecosystem_dict,
    text_config,
)

DFLASH_ARCHITECTURE = "DFlashDraftModel"

# Qwen3's tokenizer has 151669 entries in a 151936-row embedding: the first unused row is the mask token.
_KNOWN_MASK_TOKEN_IDS = {("qwen3", 151936): 151669, ("qwen3_moe", 151936): 151669}


def default_mask_token_id(target_config: Any) -> int:
    """The first unused embedding row for targets whose tokenizer length is known (Qwen3: 151669)."""
    cfg = text_config(target_config)
    key = (getattr(cfg, "model_type", None), int(cfg.vocab_size))
    if key in _KNOWN_MASK_TOKEN_IDS:
        return _KNOWN_MASK_TOKEN_IDS[key]
    raise SpectoolError(
        "no default mask token for this target: pass --mask-token-id (the first unused embedding row, i.e. "
        "len(tokenizer) when the embedding has more rows than the tokenizer; never the pad or eos token)"
    )


def _special_token_ids(target_config: Any) -> dict[int, str]:
    """pad/eos/bos ids of the target, which must never double as the mask token."""
    cfg = text_config(target_config)
    found: dict[int, str] = {}
    for name in ("pad", "eos", "bos"):
        value = getattr(cfg, f"{name}_token_id", None)
        for token_id in value if isinstance(value, list | tuple) else [value]:
            if isinstance(token_id, int):
                found.setdefault(token_id, name)
    return found


def check_mask_token_id(mask_token_id: int, vocab_size: int) -> int:
    if not 0 <= int(mask_token_id) < vocab_size:
        raise SpectoolError(f"mask token id {mask_token_id} is outside the target vocabulary [0, {vocab_size})")
    return int(mask_token_id)


class BlockDraftConfigMixin:
    """Fields shared by the DFlash and DSpark configs, filled from a target."""

    @classmethod
    def _block_fields(
        cls,
        target_config: Any,
        *,
        target_layer_ids: Sequence[int],
        num_draft_layers: int,
        block_size: int,
        mask_token_id: int | None,
        overrides: dict[str, Any],
        method: str,
    ) -> dict[str, Any]:
        fields = draft_fields_from_target(target_config)
        if overrides.get("hidden_size", fields["hidden_size"]) != fields["hidden_size"]:
            raise SpectoolError(
                f"a {method} draft must be as wide as its target (hidden_size {fields['hidden_size']}): it reads "
                "the target's embeddings and its output goes through the target's lm_head"
            )
        if block_size < 2:
            raise SpectoolError(f"{method} block_size must be at least 2, got {block_size}")
        fields.update(overrides)
        fields.pop("mlp_bias")  # Qwen3 layers have no MLP bias (the dflash package would reject the keys)
        if mask_token_id is None:
            mask_token_id = default_mask_token_id(target_config)
        reserved = _special_token_ids(target_config)
        if mask_token_id in reserved:
            raise SpectoolError(
                f"mask token id {mask_token_id} is the target's {reserved[mask_token_id]} token; use an unused "
                "embedding row (--mask-token-id)"
            )
        return {
            **fields,
            "num_hidden_layers": num_draft_layers,
            "tie_word_embeddings": False,
            "block_size": block_size,
            "mask_token_id": check_mask_token_id(mask_token_id, fields["vocab_size"]),
            "target_layer_ids": list(target_layer_ids),
        }


class DFlashDraftConfig(BlockDraftConfigMixin, Qwen3Config):
    """Qwen3 config of a DFlash draft; ``to_dict`` writes the z-lab ``dflash_config`` block."""

    block_size: int = 16
    mask_token_id: int | None = None
    target_layer_ids: list[int] | None = None
    num_target_layers: int | None = None
    dflash_config: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if isinstance(self.dflash_config, dict):
            self.block_size = int(self.dflash_config.get("block_size", self.block_size))
            self.mask_token_id = self.dflash_config.get("mask_token_id", self.mask_token_id)
            ids = self.dflash_config.get("target_layer_ids", self.target_layer_ids)
            self.target_layer_ids = list(ids) if ids is not None else None
        self.dflash_config = None
        super().__post_init__(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["dflash_config"] = {
            "block_size": self.block_size,
            "mask_token_id": self.mask_token_id,
            "target_layer_ids": list(self.target_layer_ids or []),
        }
        return ecosystem_dict(out, DFLASH_ARCHITECTURE, drop=("mask_token_id", "target_layer_ids"))

    @classmethod
    def from_target(
        cls,
        target_config: Any,
        *,
        target_layer_ids: Sequence[int],
        num_draft_layers: int | None = None,
        block_size: int = 16,
        mask_token_id: int | None = None,
        **overrides: Any,
    ) -> DFlashDraftConfig:
        """Draft config for a target; ``num_draft_layers`` defaults to the number of feature layers K.
        ``overrides`` may change heads, kv heads, head_dim and intermediate_size (the width must stay H)."""
        fields = cls._block_fields(
            target_config,
            target_layer_ids=target_layer_ids,
            num_draft_layers=num_draft_layers or len(target_layer_ids),
            block_size=block_size,
            mask_token_id=mask_token_id,
            overrides=overrides,
            method="DFlash",
        )
        return cls(**fields)


# ----------------------------------------------------------------------------------------------------------
# Block layout helpers (training and decoding)
# ----------------------------------------------------------------------------------------------------------


def block_input_ids(anchor_ids: torch.Tensor, block_size: int, mask_token_id: int) -> torch.Tensor:
    """``[B, A]`` anchor tokens -> ``[B, A * block_size]`` blocks ``[anchor, MASK, ..., MASK]``."""
    blocks = anchor_ids.new_full((*anchor_ids.shape, block_size), mask_token_id)
    blocks[..., 0] = anchor_ids
    return blocks.flatten(-2)


def block_position_ids(anchor_positions: torch.Tensor, context_length: int, block_size: int) -> torch.Tensor:
    """Rotary positions ``[B, context_length + A * block_size]``: the context 0..S-1, then block j slot k at
    ``anchor_j + k``."""
    batch = anchor_positions.shape[0]
    device = anchor_positions.device
    context = torch.arange(context_length, device=device).expand(batch, context_length)
    blocks = anchor_positions[..., None] + torch.arange(block_size, device=device)
    return torch.cat((context, blocks.flatten(1)), dim=1)


def build_block_attention_mask(
    anchor_positions: torch.Tensor,
    context_length: int,
    block_size: int,
    anchor_valid: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean ``[B, 1, A*block_size, context_length + A*block_size]`` training mask (True = may attend).

    A query in block j sees the context keys at positions strictly before ``anchor_positions[:, j]`` and every key
    of its own block (bidirectionally), nothing of other blocks. A padding block (``anchor_valid`` False) sees only
    its own block, so no attention row is ever fully masked. ``context_mask`` ``[B, S]`` (1 = real) hides padded
    context keys.
    """
    batch, num_anchors = anchor_positions.shape
    device = anchor_positions.device
    queries = num_anchors * block_size
    query_block = torch.arange(queries, device=device) // block_size  # [Q]
    anchors = anchor_positions.gather(1, query_block.expand(batch, queries))  # [B, Q]
    context = torch.arange(context_length, device=device)
    sees_context = context[None, None, :] < anchors[:, :, None]  # [B, Q, S]
    if anchor_valid is not None:
        sees_context = sees_context & anchor_valid.bool().gather(1, query_block.expand(batch, queries))[:, :, None]
    if context_mask is not None:
        sees_context = sees_context & context_mask.bool()[:, None, :]
    same_block = (query_block[:, None] == query_block[None, :]).expand(batch, queries, queries)
    return torch.cat((sees_context, same_block), dim=-1)[:, None]


# ----------------------------------------------------------------------------------------------------------
# Backbone
# ----------------------------------------------------------------------------------------------------------


class DFlashDecoderLayer(nn.Module):
    """Qwen3 decoder layer whose queries come from the block and keys/values from ``[context | block]``."""

    def __init__(self, config: Qwen3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = AttentionProjections(config, qk_norm=True)
        self.mlp = GatedMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        context: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: DraftKVCache | None,
    ) -> torch.Tensor:
        attn = self.self_attn
        cos, sin = cos_sin
        x = self.input_layernorm(hidden)
        block_len, context_len = x.shape[1], context.shape[1]
        # The table covers [new context | block]: queries take its trailing block_len rows.
        q = apply_rotary(attn.query(x), cos[:, -block_len:], sin[:, -block_len:])
        # One projection over [new context | block] (the rotary table covers exactly those positions).
        k, v = attn.key_value(torch.cat((context, x), dim=1))
        k = apply_rotary(k, cos, sin)
        if cache is not None:
            k_ctx, v_ctx = cache.update(self.layer_idx, k[:, :, :context_len], v[:, :, :context_len])
            k = torch.cat((k_ctx, k[:, :, context_len:]), dim=2)
            v = torch.cat((v_ctx, v[:, :, context_len:]), dim=2)
        hidden = hidden + attn.output(attend(q, k, v, mask, attn.scaling))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class BlockDiffusionBackbone:
    """The DFlash backbone, shared with DSpark: fc + hidden_norm over target features, N_d layers, norm."""

    def _build_backbone(self, config: Any) -> None:
        if not config.target_layer_ids:
            raise SpectoolError("the draft config has no target_layer_ids")
        hidden = config.hidden_size
        self.layers = nn.ModuleList(DFlashDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.fc = nn.Linear(len(config.target_layer_ids) * hidden, hidden, bias=False)
        self.hidden_norm = RMSNorm(hidden, eps=config.rms_norm_eps)
        self.norm = RMSNorm(hidden, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    @property
    def target_layer_ids(self) -> list[int]:
        return list(self.config.target_layer_ids)

    def new_cache(self) -> DraftKVCache:
        """A cache of the CONTEXT keys/values only (blocks are never cached); crop it if the context shrinks."""
        return DraftKVCache(num_layers=len(self.layers))

    def run_backbone(
        self,
        inputs_embeds: torch.Tensor,
        target_hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: DraftKVCache | None = None,
    ) -> torch.Tensor:
        """Draft hidden states ``[B, q, H]`` for block embeddings ``[B, q, H]`` given new context features
        ``[B, c, K*H]``.

        ``position_ids`` ``[B, c + q]`` (or ``[c + q]``) are the positions of the new context then the block.
        With ``past_key_values``, the new context keys/values are appended to it and the block attends to all
        cached context. ``attention_mask`` (boolean ``[B, 1, q, cached + c + q]``) is for training; None lets
        every query see every key.
        """
        if position_ids.dim() == 1:
            position_ids = position_ids.expand(inputs_embeds.shape[0], -1)
        expected = target_hidden.shape[1] + inputs_embeds.shape[1]
        if position_ids.shape[1] != expected:
            raise ValueError(
                f"position_ids cover {position_ids.shape[1]} positions, expected context + block = {expected}"
            )
        dtype = self.fc.weight.dtype
        context = self.hidden_norm(self.fc(target_hidden.to(dtype)))
        hidden = inputs_embeds.to(dtype)
        cos_sin = self.rotary_emb(position_ids, dtype)
        for layer in self.layers:
            hidden = layer(hidden, context, cos_sin, attention_mask, past_key_values)
        return self.norm(hidden)


class Qwen3DFlashDraftModel(BlockDiffusionBackbone, DraftModelMixin, PreTrainedModel):
    """DFlash draft model; see the module docstring for the architecture and the on-disk layout."""

    config_class = DFlashDraftConfig
    config: DFlashDraftConfig
    base_model_prefix = ""
    _no_split_modules: ClassVar[list[str]] = ["DFlashDecoderLayer"]

    def __init__(self, config: DFlashDraftConfig) -> None:
        super().__init__(config)
        self._build_backbone(config)
        self.post_init()

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        target_hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: DraftKVCache | None = None,
    ) -> torch.Tensor:
        """Draft hidden states for a block (see ``run_backbone``); ``inputs_embeds`` come from the target's
        embedding of ``block_input_ids``."""
        return self.run_backbone(inputs_embeds, target_hidden, position_ids, attention_mask, past_key_values)

    @staticmethod
    def compute_logits(hidden_states: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """Logits through the TARGET's lm_head (the draft drafts greedily on these)."""
        return lm_head(hidden_states)
