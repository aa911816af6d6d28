"""The architecture facts of a target, read from its config.json (no weights, no torch).

One normalised view (`TargetArch`) of the fields every draft needs, whichever way the config spells them:
`head_dim` given or derived, `rope_theta` / `rope_scaling` (transformers 4) or `rope_parameters`
(transformers 5), `torch_dtype` or `dtype`, dense or MoE feed-forward, and a multimodal target's text stack
read from `text_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from spectool.errors import SpectoolError


class ConfigError(SpectoolError):
    """A config.json that lacks a field spectool needs or holds one of the wrong type (exit code 1)."""


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The text stack of a config: `text_config` for multimodal targets, the config itself otherwise."""
    nested = config.get("text_config")
    if isinstance(nested, dict) and "num_hidden_layers" in nested:
        return nested
    return config


def architectures_of(config: dict[str, Any], where: str = "config.json") -> list[str]:
    """The config's `architectures` strings, a multimodal text stack's own appended (empty when none are listed)."""
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(config).__name__}")
    cfg = text_config(config)
    archs = config.get("architectures") or cfg.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"{where}: field 'architectures' should be a list of strings, got {archs!r}")
    nested_archs = cfg.get("architectures") if cfg is not config else None
    if isinstance(nested_archs, list):
        archs = list(archs) + [a for a in nested_archs if isinstance(a, str) and a not in archs]
    return list(archs)


def _field(cfg: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    value = cfg.get(name, default)
    if value is ...:
        raise ConfigError(f"{where}: field '{name}' is missing (spectool needs it to size a draft)")
    if value is None and default is None:
        return None
    # bool is an int subclass: reject it where a number is expected.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise ConfigError(f"{where}: field '{name}' should be {_kind_name(kind)}, got {value!r}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _as_tuple(kind))


def _rope(cfg: dict[str, Any], where: str) -> tuple[str, float | None, dict[str, Any] | None]:
    """(rope type, rope theta, scaling parameters) of a text config; transformers 5 folds rope_theta and
    rope_scaling into rope_parameters."""
    rope_params = cfg.get("rope_parameters")
    rope_scaling = cfg.get("rope_scaling")
    rope_theta = cfg.get("rope_theta")
    if isinstance(rope_params, dict):
        rope_theta = rope_params.get("rope_theta", rope_theta)
        if rope_params.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    if rope_scaling is not None and not isinstance(rope_scaling, dict):
        raise ConfigError(f"{where}: field 'rope_scaling' should be an object or null, got {rope_scaling!r}")
    if rope_theta is not None and not isinstance(rope_theta, (int, float)):
        raise ConfigError(f"{where}: field 'rope_theta' should be a number, got {rope_theta!r}")
    rope_type = "default"
    if rope_scaling:
        rope_type = str(rope_scaling.get("rope_type") or rope_scaling.get("type") or "default")
    return (
        rope_type,
        float(rope_theta) if rope_theta is not None else None,
        dict(rope_scaling) if rope_scaling else None,
    )


def _layer_types(cfg: dict[str, Any], layers: int, where: str) -> tuple[str, ...] | None:
    """`layer_types` (one attention kind per layer), checked against the depth."""
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        return None
    if not isinstance(layer_types, list) or not all(isinstance(kind, str) for kind in layer_types):
        raise ConfigError(f"{where}: field 'layer_types' should be a list of strings, got {layer_types!r}")
    if len(layer_types) != layers:
        raise ConfigError(
            f"{where}: 'layer_types' names {len(layer_types)} layers but num_hidden_layers is {layers}; "
            "give one entry per layer"
        )
    return tuple(layer_types)


@dataclass(frozen=True)
class TargetArch:
    """The normalised architecture of a target's text stack."""

    architectures: tuple[str, ...]
    model_type: str
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int | None
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    head_dim_explicit: bool
    vocab_size: int
    max_position_embeddings: int | None
    rms_norm_eps: float | None
    rope_type: str
    rope_theta: float | None
    rope_scaling: dict[str, Any] | None
    partial_rotary_factor: float | None
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    dtype: str | None
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts)

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str = "config.json") -> TargetArch:
        """Read a config.json dict; `where` names the file in error messages."""
        if not isinstance(config, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(config).__name__}")
        cfg = text_config(config)
        archs = architectures_of(config, where)

        model_type = _field(cfg, "model_type", str, where, default=config.get("model_type", "unknown"))
        layers = _field(cfg, "num_hidden_layers", int, where)
        hidden = _field(cfg, "hidden_size", int, where)
        heads = _field(cfg, "num_attention_heads", int, where)
        kv_heads = _field(cfg, "num_key_value_heads", int, where, default=heads)
        vocab = _field(cfg, "vocab_size", int, where)
        for name, value in (("num_hidden_layers", layers), ("hidden_size", hidden),
                            ("num_attention_heads", heads), ("vocab_size", vocab)):  # fmt: skip
            if value < 1:
                raise ConfigError(f"{where}: field '{name}' must be positive, got {value}")
        explicit_head_dim = cfg.get("head_dim")
        if explicit_head_dim is not None:
            head_dim = _field(cfg, "head_dim", int, where)
        else:
            if hidden % heads:
                raise ConfigError(
                    f"{where}: no 'head_dim' and hidden_size {hidden} is not divisible by num_attention_heads {heads}"
                )
            head_dim = hidden // heads

        rope_type, rope_theta, rope_scaling = _rope(cfg, where)
        num_experts = cfg.get("num_experts") or cfg.get("num_local_experts")
        layer_types = _layer_types(cfg, layers, where)
        max_positions = cfg.get("max_position_embeddings")
        if max_positions is not None and (not isinstance(max_positions, int) or max_positions < 1):
            raise ConfigError(
                f"{where}: field 'max_position_embeddings' must be a positive integer, got {max_positions!r}"
            )
        return cls(
            architectures=tuple(archs),
            model_type=model_type,
            num_hidden_layers=layers,
            hidden_size=hidden,
            intermediate_size=cfg.get("intermediate_size"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            head_dim_explicit=explicit_head_dim is not None,
            vocab_size=vocab,
            max_position_embeddings=cfg.get("max_position_embeddings"),
            rms_norm_eps=cfg.get("rms_norm_eps"),
            rope_type=rope_type,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            partial_rotary_factor=cfg.get("partial_rotary_factor"),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            dtype=cfg.get("dtype") or cfg.get("torch_dtype") or config.get("dtype") or config.get("torch_dtype"),
            num_experts=int(num_experts) if num_experts else None,
            num_experts_per_tok=cfg.get("num_experts_per_tok") or cfg.get("experts_per_token"),
            moe_intermediate_size=cfg.get("moe_intermediate_size"),
            sliding_window=cfg.get("sliding_window"),
            layer_types=layer_types,
            extra={k: v for k, v in cfg.items() if k.startswith("qk_") or k == "use_qk_norm"},
        )

    def parameter_counts(self) -> tuple[int, int]:
        """Estimated (total, active-per-token) parameters, from the shapes the config implies.

        Counts embeddings, attention (with q/k norms for Qwen3 and sinks for gpt-oss), the feed-forward
        (dense, or every expert plus the router for MoE), norms and an untied lm_head. For a dense model
        total == active; for MoE the active count keeps only `num_experts_per_tok` experts.
        """
        h, hd = self.hidden_size, self.head_dim
        q_out, kv_out = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = h * q_out + 2 * h * kv_out + q_out * h
        if self.attention_bias:
            attn += q_out + 2 * kv_out + h
        if self.model_type.startswith("qwen3"):
            attn += 2 * hd  # q_norm, k_norm
        if self.model_type == "gpt_oss":
            attn += self.num_attention_heads  # attention sinks
        norms = 2 * h
        if self.is_moe:
            inner = self.moe_intermediate_size or self.intermediate_size or 0
            per_expert = 3 * h * inner
            router = h * self.num_experts
            if self.model_type == "gpt_oss":  # fused gate_up and down carry biases, the router too
                per_expert += 2 * inner + h
                router += self.num_experts
            ffn_total = self.num_experts * per_expert + router
            ffn_active = (self.num_experts_per_tok or self.num_experts) * per_expert + router
        else:
            inner = self.intermediate_size or 0
            ffn_total = ffn_active = 3 * h * inner + (2 * inner + h if self.mlp_bias else 0)
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        fixed = embed + head + h  # + final norm
        n = self.num_hidden_layers
        return fixed + n * (attn + norms + ffn_total), fixed + n * (attn + norms + ffn_active)
