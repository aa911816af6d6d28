"""The parameter layout of a draft, computed from a `DraftSpec` and the target's architecture alone.

`spectool inspect` uses this to show what `init` will build without importing torch or building a model
(it answers in a fraction of a second); a test checks it against the real draft modules, tensor by tensor.
Names are the keys of the method's on-disk format (SPEC §5).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Literal

from spectool.arch import TargetArch
from spectool.registry import DraftSpec

#: trainable: learnt and stored; frozen: a stored copy of a target tensor; buffer: stored, not learnt;
#: borrowed: the target's own tensor, used at run time and not stored in the checkpoint.
Role = Literal["trainable", "frozen", "buffer", "borrowed"]


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    role: Role
    dtype: str = "bfloat16"

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class DraftLayout:
    method: str
    tensors: tuple[Tensor, ...]

    def count(self, *roles: Role) -> int:
        return sum(t.numel for t in self.tensors if t.role in roles)

    @property
    def trainable_params(self) -> int:
        return self.count("trainable")

    @property
    def frozen_params(self) -> int:
        """Frozen copies stored in the checkpoint (DSpark embed_tokens / lm_head, EAGLE-1 embed_tokens)."""
        return self.count("frozen")

    @property
    def stored_bytes_bf16(self) -> int:
        """Size of the checkpoint's tensors with weights in bf16 (d2t is int64, t2d one byte per entry)."""
        sizes = {"bfloat16": 2, "int64": 8, "bool": 1}
        return sum(t.numel * sizes[t.dtype] for t in self.tensors if t.role != "borrowed")


def _attention(prefix: str, arch: TargetArch, in_features: int, qk_norm: bool) -> list[Tensor]:
    h, hd = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * hd, arch.num_key_value_heads * hd
    out = [
        Tensor(f"{prefix}.q_proj.weight", (q, in_features), "trainable"),
        Tensor(f"{prefix}.k_proj.weight", (kv, in_features), "trainable"),
        Tensor(f"{prefix}.v_proj.weight", (kv, in_features), "trainable"),
        Tensor(f"{prefix}.o_proj.weight", (h, q), "trainable"),
    ]
    if arch.attention_bias:
        out += [
            Tensor(f"{prefix}.q_proj.bias", (q,), "trainable"),
            Tensor(f"{prefix}.k_proj.bias", (kv,), "trainable"),
            Tensor(f"{prefix}.v_proj.bias", (kv,), "trainable"),
            Tensor(f"{prefix}.o_proj.bias", (h,), "trainable"),
        ]
    if qk_norm:
        out += [
            Tensor(f"{prefix}.q_norm.weight", (hd,), "trainable"),
            Tensor(f"{prefix}.k_norm.weight", (hd,), "trainable"),
        ]
    return out


def _mlp(prefix: str, arch: TargetArch) -> list[Tensor]:
    h = arch.hidden_size
    inner = arch.intermediate_size or 4 * h
    out = [
        Tensor(f"{prefix}.gate_proj.weight", (inner, h), "trainable"),
        Tensor(f"{prefix}.up_proj.weight", (inner, h), "trainable"),
        Tensor(f"{prefix}.down_proj.weight", (h, inner), "trainable"),
    ]
    if arch.mlp_bias:
        out += [
            Tensor(f"{prefix}.gate_proj.bias", (inner,), "trainable"),
            Tensor(f"{prefix}.up_proj.bias", (inner,), "trainable"),
            Tensor(f"{prefix}.down_proj.bias", (h,), "trainable"),
        ]
    return out


def _norm(name: str, arch: TargetArch) -> Tensor:
    return Tensor(f"{name}.weight", (arch.hidden_size,), "trainable")


def _qwen3_layers(arch: TargetArch, count: int) -> list[Tensor]:
    out: list[Tensor] = []
    for i in range(count):
        p = f"layers.{i}"
        out += _attention(f"{p}.self_attn", arch, arch.hidden_size, qk_norm=True)
        out += _mlp(f"{p}.mlp", arch)
        out += [_norm(f"{p}.input_layernorm", arch), _norm(f"{p}.post_attention_layernorm", arch)]
    return out


def draft_layout(spec: DraftSpec, arch: TargetArch) -> DraftLayout:
    """Every tensor the draft of `spec` holds or borrows, with its shape and role."""
    h, v = arch.hidden_size, arch.vocab_size
    k = len(spec.target_layer_ids)
    tensors: list[Tensor] = []
    if spec.method == "eagle1":
        tensors.append(Tensor("embed_tokens.weight", (v, h), "frozen"))
        tensors.append(Tensor("fc.weight", (h, 2 * h), "trainable"))
        tensors.append(Tensor("fc.bias", (h,), "trainable"))
        for i in range(spec.num_draft_layers):
            p = f"layers.{i}"
            tensors += _attention(f"{p}.self_attn", arch, h, qk_norm=False)
            tensors += _mlp(f"{p}.mlp", arch)
            if i > 0:  # SafeAILab's EAGLE: the first layer's input is fc's output, not normed again
                tensors.append(_norm(f"{p}.input_layernorm", arch))
            tensors.append(_norm(f"{p}.post_attention_layernorm", arch))
        tensors.append(_norm("norm", arch))
        tensors.append(Tensor("lm_head.weight", (v, h), "borrowed"))
    elif spec.method == "eagle3":
        vd = spec.draft_vocab_size or v
        tensors.append(Tensor("embed_tokens.weight", (v, h), "borrowed"))
        tensors += _attention("midlayer.self_attn", arch, 2 * h, qk_norm=False)
        tensors += _mlp("midlayer.mlp", arch)
        tensors += [
            _norm("midlayer.input_layernorm", arch),
            _norm("midlayer.hidden_norm", arch),
            _norm("midlayer.post_attention_layernorm", arch),
            Tensor("fc.weight", (h, k * h), "trainable"),
            _norm("norm", arch),
            Tensor("lm_head.weight", (vd, h), "trainable"),
        ]
        if spec.draft_vocab_size:
            tensors += [Tensor("d2t", (vd,), "buffer", "int64"), Tensor("t2d", (v,), "buffer", "bool")]
    else:  # dflash, dspark: the same backbone
        tensors += _qwen3_layers(arch, spec.num_draft_layers)
        tensors += [Tensor("fc.weight", (h, k * h), "trainable"), _norm("hidden_norm", arch), _norm("norm", arch)]
        if spec.method == "dflash":
            tensors += [
                Tensor("embed_tokens.weight", (v, h), "borrowed"),
                Tensor("lm_head.weight", (v, h), "borrowed"),
            ]
        else:
            r = spec.markov_rank or 0
            tensors += [
                Tensor("embed_tokens.weight", (v, h), "frozen"),
                Tensor("lm_head.weight", (v, h), "frozen"),
                Tensor("markov_head.markov_w1.weight", (v, r), "trainable"),
                Tensor("markov_head.markov_w2.weight", (v, r), "trainable"),
                Tensor("confidence_head.proj.weight", (1, h + r), "trainable"),
                Tensor("confidence_head.proj.bias", (1,), "trainable"),
            ]
    return DraftLayout(spec.method, tuple(tensors))
