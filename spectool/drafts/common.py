"""Building blocks shared by every draft family.

RMSNorm, the rotary embedding (any rope type transformers knows), grouped-query attention projections, the gated
MLP, a crop-able KV cache, and the helpers that read a target's config into draft config fields. Each draft file
composes these into the architecture of its paper.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from spectool.errors import SpectoolError

# ----------------------------------------------------------------------------------------------------------
# Reading a target config
# ----------------------------------------------------------------------------------------------------------


def text_config(config: Any) -> Any:
    """The text stack of a target config: ``config.text_config`` for multimodal targets, else the config."""
    nested = getattr(config, "text_config", None)
    return nested if nested is not None else config


def head_dim_of(config: Any) -> int:
    """``head_dim`` from the config when set (Qwen3, gpt-oss: NOT hidden/heads), else hidden_size / heads."""
    head_dim = getattr(config, "head_dim", None)
    if head_dim:
        return int(head_dim)
    return int(config.hidden_size) // int(config.num_attention_heads)


def rope_parameters_of(config: Any) -> dict[str, Any]:
    """The config's rope settings as one transformers-5 ``rope_parameters`` dict.

    Accepts the v5 form (``rope_parameters``) and the older one (``rope_theta`` + ``rope_scaling``); per-layer-type
    nested parameters resolve to the ``full_attention`` entry (what a draft's full-attention layers use).
    """
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
    params = copy.deepcopy(dict(params)) if isinstance(params, dict) and params else {}
    if not params:
        scaling = getattr(config, "rope_scaling", None)
        params = copy.deepcopy(dict(scaling)) if isinstance(scaling, dict) else {}
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    params.setdefault("rope_type", "default")
    if "rope_theta" not in params:
        params["rope_theta"] = float(getattr(config, "rope_theta", None) or 10000.0)
    partial = getattr(config, "partial_rotary_factor", None)
    if partial is not None and "partial_rotary_factor" not in params:
        params["partial_rotary_factor"] = float(partial)
    rope_type = params["rope_type"]
    if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
        raise SpectoolError(
            f"rope type {rope_type!r} is not supported by the drafts; supported: "
            f"{', '.join(['default', *ROPE_INIT_FUNCTIONS])}"
        )
    if rope_type in ("llama3", "yarn", "longrope"):
        params.setdefault(
            "original_max_position_embeddings",
            getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings,
        )
    return params


def draft_fields_from_target(target_config: Any) -> dict[str, Any]:
    """The fields a draft config copies from its target: width, heads, head_dim, biases, rope, norm eps, vocab.

    ``num_target_layers`` is the target's depth N. The dense ``intermediate_size`` is read even for MoE targets
    (drafts are dense).
    """
    cfg = text_config(target_config)
    heads = int(cfg.num_attention_heads)
    eps = getattr(cfg, "rms_norm_eps", None) or getattr(cfg, "layer_norm_eps", None) or 1e-6
    intermediate = getattr(cfg, "intermediate_size", None) or 4 * int(cfg.hidden_size)
    return {
        "vocab_size": int(cfg.vocab_size),
        "hidden_size": int(cfg.hidden_size),
        "intermediate_size": int(intermediate),
        "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(cfg, "num_key_value_heads", None) or heads),
        "head_dim": head_dim_of(cfg),
        "hidden_act": getattr(cfg, "hidden_act", None) or "silu",
        "max_position_embeddings": int(getattr(cfg, "max_position_embeddings", None) or 4096),
        "rms_norm_eps": float(eps),
        "attention_bias": bool(getattr(cfg, "attention_bias", False)),
        "mlp_bias": bool(getattr(cfg, "mlp_bias", False)),
        "rope_parameters": rope_parameters_of(cfg),
        "num_target_layers": int(cfg.num_hidden_layers),
    }


def legacy_rope_keys(rope_parameters: dict[str, Any]) -> dict[str, Any]:
    """``rope_theta`` and ``rope_scaling`` for readers that predate transformers-5 ``rope_parameters`` (engines)."""
    scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") == "default" and set(scaling) <= {"rope_type"}:
        scaling = None
    return {"rope_theta": rope_parameters.get("rope_theta", 10000.0), "rope_scaling": scaling}


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 (as Llama/Qwen3 do), scaled by a learned weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        if input_dtype == torch.float32 and self.weight.dtype == torch.float32:
            # The same arithmetic as below as one fused op (decoding a small draft is bound by op count).
            return F.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.variance_epsilon)
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embedding, from a config's ``rope_parameters``.

    ``default`` rope is computed here; every other type (llama3, yarn, linear, dynamic, longrope, ...) uses
    transformers' ``ROPE_INIT_FUNCTIONS`` on the draft config, so the draft rotates exactly as its target. The
    inverse frequencies hold no state in the checkpoint: they are derived on first use per device (and per length
    regime for the length-dependent ``dynamic`` / ``longrope`` types).
    """

    _LENGTH_DEPENDENT: ClassVar[tuple[str, ...]] = ("dynamic", "longrope")

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        self.head_dim = head_dim_of(config)
        self._tables: dict[tuple[str, int], tuple[torch.Tensor, float]] = {}

    def _regime(self, seq_len: int) -> int:
        params = self.config.rope_parameters
        if self.rope_type == "dynamic":
            return max(seq_len, int(self.config.max_position_embeddings))
        if self.rope_type == "longrope":
            return int(seq_len > int(params["original_max_position_embeddings"]))
        return 0

    def _inverse_frequencies(self, device: torch.device, seq_len: int) -> tuple[torch.Tensor, float]:
        key = (str(device), self._regime(seq_len))
        if key not in self._tables:
            params = self.config.rope_parameters
            if self.rope_type == "default":
                dim = int(self.head_dim * params.get("partial_rotary_factor", 1.0))
                exponents = torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim
                inv_freq, scaling = 1.0 / (params["rope_theta"] ** exponents), 1.0
            else:
                length = seq_len if self.rope_type in self._LENGTH_DEPENDENT else None
                inv_freq, scaling = ROPE_INIT_FUNCTIONS[self.rope_type](self.config, device, seq_len=length)
            self._tables[key] = (inv_freq.to(device=device, dtype=torch.float), float(scaling))
        return self._tables[key]

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape ``[B, L, rotary_dim]`` for ``position_ids`` ``[B, L]``."""
        seq_len = 1
        if self.rope_type in self._LENGTH_DEPENDENT and position_ids.numel() and position_ids.device.type != "meta":
            seq_len = int(position_ids.max()) + 1  # a device sync, so only for the length-dependent types
        inv_freq, scaling = self._inverse_frequencies(position_ids.device, seq_len)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, heads, L, head_dim]`` by ``cos``/``sin`` ``[B, L, rotary_dim]``.

    With partial rotary (rotary_dim < head_dim) the trailing dims pass through unrotated.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``, the Llama/Qwen3 feed-forward block."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class AttentionProjections(nn.Module):
    """q/k/v/o projections of grouped-query attention, optionally with per-head q/k RMSNorm (Qwen3).

    ``input_size`` is the width fed to q/k/v (2H for EAGLE-3's fused input); o_proj maps back to hidden_size.
    """

    def __init__(self, config: Any, *, input_size: int | None = None, qk_norm: bool = False) -> None:
        super().__init__()
        input_size = input_size or config.hidden_size
        self.head_dim = head_dim_of(config)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(config.num_key_value_heads)
        if self.num_heads % self.num_kv_heads:
            raise SpectoolError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads})"
            )
        self.scaling = self.head_dim**-0.5
        bias = bool(getattr(config, "attention_bias", False))
        self.q_proj = nn.Linear(input_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(input_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(input_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.qk_norm = qk_norm

    @property
    def num_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], -1, self.head_dim)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, in] -> [B, heads, L, head_dim]`` (normed per head when qk_norm), before rotary."""
        q = self._heads(self.q_proj(x))
        if self.qk_norm:
            q = self.q_norm(q)
        return q.transpose(1, 2)

    def key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, L, in] -> ([B, kv_heads, L, head_dim],) * 2`` (keys normed per head when qk_norm), before rotary."""
        k = self._heads(self.k_proj(x))
        if self.qk_norm:
            k = self.k_norm(k)
        return k.transpose(1, 2), self._heads(self.v_proj(x)).transpose(1, 2)

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        """``[B, heads, L, head_dim] -> [B, L, hidden]``."""
        return self.o_proj(attn.transpose(1, 2).reshape(attn.shape[0], attn.shape[2], -1))


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Scaled dot-product attention with grouped kv heads; ``mask`` is boolean, True = may attend."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=q.shape[1] != k.shape[1])


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, kv_heads, L, d] -> [B, kv_heads * groups, L, d]`` (each kv head serves ``groups`` query heads)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def causal_mask(
    q_len: int,
    kv_len: int,
    device: torch.device,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean ``[B|1, 1, q_len, kv_len]``: query i (the last q_len of kv_len positions) sees keys ``<= i``.

    ``padding_mask`` ``[B, kv_len]`` (1 = real token) hides padded keys; a query always keeps its own key so no
    row is fully masked.
    """
    offset = kv_len - q_len
    rows = torch.arange(q_len, device=device)[:, None] + offset
    cols = torch.arange(kv_len, device=device)[None, :]
    mask = (cols <= rows)[None, None]
    if padding_mask is not None:
        mask = mask & (padding_mask.bool()[:, None, None, :] | (cols == rows)[None, None])
    return mask


# ----------------------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------------------


class DraftKVCache:
    """Per-layer keys/values ``[B, kv_heads, L, head_dim]`` of a draft, grown by appending, cut back by ``crop``.

    The decoding loop crops it to the committed length after each verification (the decoding rules); the rotary is
    applied before caching, so a cropped cache stays valid.
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this call's ``k``/``v`` for one layer and return everything cached for it."""
        old_k, old_v = self.keys[layer_idx], self.values[layer_idx]
        if old_k is not None:
            k, v = torch.cat((old_k, k), dim=2), torch.cat((old_v, v), dim=2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v

    def layer(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self) -> int:
        """Number of cached positions (all layers hold the same count)."""
        k = self.keys[0]
        return 0 if k is None else int(k.shape[2])

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions of every layer."""
        if length < 0 or length > self.get_seq_length():
            raise ValueError(f"cannot crop a cache of {self.get_seq_length()} positions to {length}")
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if k is not None:
                self.keys[i], self.values[i] = k[:, :, :length], v[:, :, :length]

    def reset(self) -> None:
        self.keys = [None] * len(self.keys)
        self.values = [None] * len(self.values)


# ----------------------------------------------------------------------------------------------------------
# Draft model mixin
# ----------------------------------------------------------------------------------------------------------


class DraftModelMixin:
    """Trainable/frozen bookkeeping shared by the drafts.

    ``frozen_parameter_prefixes`` names the parameters copied from the target and never trained (the method's paper).
    """

    frozen_parameter_prefixes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' loader, then re-freeze the target copies (loading replaces the parameters)."""
        loaded = super().from_pretrained(*args, **kwargs)  # type: ignore[misc]
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.freeze_target_copies()
        return loaded

    def _is_frozen_name(self, name: str) -> bool:
        return any(name.startswith(prefix) for prefix in self.frozen_parameter_prefixes)

    def freeze_target_copies(self) -> None:
        """Set ``requires_grad=False`` on the target copies (call again after loading or moving weights)."""
        for name, param in self.named_parameters():  # type: ignore[attr-defined]
            if self._is_frozen_name(name):
                param.requires_grad_(False)

    def frozen_parameter_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if self._is_frozen_name(n)]  # type: ignore[attr-defined]

    def trainable_parameter_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if not self._is_frozen_name(n)]  # type: ignore[attr-defined]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not self._is_frozen_name(n)]  # type: ignore[attr-defined]


def ecosystem_dict(config_dict: dict[str, Any], architecture: str, drop: Sequence[str] = ()) -> dict[str, Any]:
    """Finish a draft config's ``to_dict``: the architecture string other tools dispatch on, legacy rope keys."""
    for key in drop:
        config_dict.pop(key, None)
    config_dict["architectures"] = [architecture]
    rope = config_dict.get("rope_parameters")
    if isinstance(rope, dict):
        config_dict.update(legacy_rope_keys(rope))
    return config_dict
