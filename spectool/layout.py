"""The parameter layout of a draft: `Tensor` and `DraftLayout`, and the tensor lists of the building blocks
(attention, MLP, norms, Qwen3 decoder layers) that each method's `layout` puts together.

`spectool inspect` uses this to show what `init` will build without importing torch or building a model
(it answers in a fraction of a second); a test checks it against the real draft modules, tensor by tensor.
Names are the keys of the method's on-disk format (its published layout); `spectool.registry.draft_layout` builds one.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Literal

from spectool.arch import TargetArch

#: trainable: learnt and stored; frozen: a stored copy of a target tensor; buffer: stored, not learnt;
#: borrowed: the target's own tensor, used at run time and not stored in the checkpoint.
Role = Literal["trainable", "frozen", "buffer", "borrowed"]


@dataclass(frozen=True)
class Tensor:
    """One tensor of a draft: its checkpoint key, shape, role and stored dtype."""

    name: str
    shape: tuple[int, ...]
    role: Role
    dtype: str = "bfloat16"

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class DraftLayout:
    """Every tensor a method's draft holds or borrows, with counts by role."""

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


def attention_tensors(prefix: str, arch: TargetArch, in_features: int, qk_norm: bool) -> list[Tensor]:
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


def mlp_tensors(prefix: str, arch: TargetArch) -> list[Tensor]:
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


def norm_tensor(name: str, arch: TargetArch) -> Tensor:
    return Tensor(f"{name}.weight", (arch.hidden_size,), "trainable")


def qwen3_layer_tensors(arch: TargetArch, count: int) -> list[Tensor]:
    out: list[Tensor] = []
    for i in range(count):
        p = f"layers.{i}"
        out += attention_tensors(f"{p}.self_attn", arch, arch.hidden_size, qk_norm=True)
        out += mlp_tensors(f"{p}.mlp", arch)
        out += [norm_tensor(f"{p}.input_layernorm", arch), norm_tensor(f"{p}.post_attention_layernorm", arch)]
    return out
