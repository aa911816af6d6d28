"""A lean decoding forward for Llama-family targets (Llama, Mistral, Qwen2, Qwen3) with a preallocated KV cache.

The decoding loop runs the target once per round on a handful of tokens. For small targets, and for any target
on a CPU, such a forward is dominated by per-operation overhead rather than arithmetic: the transformers forward
builds masks, walks a DynamicCache that concatenates per layer, and calls ~45 small ops per decoder layer. This
forward computes the same function from the same weights with ~20 ops per layer: q/k/v (and gate/up) read as one
projection each, RMSNorm as one fused op, the rotary tables precomputed for every position, and keys/values
written in place into a cache that grows by doubling. Cropping the cache is a length change.

Numerics follow the transformers implementations op for op (RMSNorm in float32 and cast back before its weight,
rotary tables from the model's own rotary module cast to the model's dtype), so the greedy output of the target
alone is the same through either path; `tests/decoding/test_fast_target.py` compares the two. Architectures or
configurations outside this family (sliding windows, dynamic rotary scaling, other activations, quantised
layers) fall back to the transformers forward: `fast_path_problem` says why.

A large float32 model on the CPU (one whose products the kernel planner times, `kernels.plan_for`) runs the
layers' glue through spectool's native kernels too (`native.rms_norm`, `native.rotary_store` and, for rounds of up
to `NATIVE_ATTENTION_TOKENS`, `native.attention`): on SmolLM2 that glue was ~5.5 of a ~24 ms step in ~20 torch ops
a layer. Their rounding differs from torch's in the last bits, as the products' already does; the rotary is the
same arithmetic bit for bit, and each token's attention, like its products, does not depend on the tokens verified
beside it.

The q/k/v and gate/up weights are packed into one tensor per layer and the model's own parameters become views
into it, so the packing costs no memory and the transformers forward (HF generate baselines) keeps working.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from spectool.decoding import native
from spectool.decoding.kernels import KernelPlan, PlannedLinear, plan_for
from spectool.gguf import progress_line
from spectool.target import FrozenTarget

#: `config.model_type` values whose decoder layer is the Llama layer (Qwen3 adds per-head q/k RMSNorm).
FAST_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: rotary scalings whose tables depend on the position only (dynamic NTK / longrope depend on the sequence length)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_INITIAL_CAPACITY = 256
#: The native glue's attention takes rounds of up to this many new tokens (a prompt goes through torch's)
NATIVE_ATTENTION_TOKENS = 16


def fast_path_problem(frozen: FrozenTarget) -> str | None:
    """Why this target cannot use the lean forward (None when it can)."""
    model, decoder = frozen.model, frozen.decoder
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in FAST_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {', '.join(FAST_MODEL_TYPES)}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(config, 'hidden_act', None)!r} is not silu"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    if model_type == "mistral" and getattr(config, "sliding_window", None):
        return "sliding-window attention"
    rope_type = getattr(getattr(decoder, "rotary_emb", None), "rope_type", None)
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rotary type {rope_type!r} is not one of {', '.join(STATIC_ROPE_TYPES)}"
    if len({p.device for p in model.parameters()}) > 1 or any(hasattr(m, "_hf_hook") for m in model.modules()):
        return "the model is spread over several devices or offloaded (accelerate hooks)"
    head = frozen.lm_head
    if type(head) is not nn.Linear or type(decoder.embed_tokens) is not nn.Embedding:
        return "the embedding or lm_head is not a plain nn.Embedding / nn.Linear"
    for layer in decoder.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        if attn is None or mlp is None or not all(type(getattr(attn, n, None)) is nn.Linear for n in names):
            return "a decoder layer is not a Llama-style attention + MLP layer"
        if not all(type(getattr(mlp, n, None)) is nn.Linear for n in ("gate_proj", "up_proj", "down_proj")):
            return "a decoder layer's MLP is not a gated gate/up/down MLP"
        if getattr(attn, "sliding_window", None):
            return "sliding-window attention"
        if not math.isclose(float(getattr(attn, "scaling", 0.0)), attn.head_dim**-0.5, rel_tol=1e-6):
            return "the attention scaling is not head_dim ** -0.5"
        if model_type == "qwen3" and not (hasattr(attn, "q_norm") and hasattr(attn, "k_norm")):
            return "a Qwen3 layer without q/k norms"
    return None


def native_glue_fits(plan: KernelPlan, dtype: torch.dtype) -> bool:
    """Whether the layers' glue (RMSNorm, rotary + cache writes) runs natively: where the products have a plan (a
    model too big for the CPU caches, on the CPU), in float32, with the native kernels built."""
    return bool(plan.tables) and dtype == torch.float32 and native.library() is not None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: normalise in float32, cast back, then scale (one fused op in float32)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    normed = F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)
    return normed if weight is None else weight * normed


def _packed(modules: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linears over the same input; the modules' parameters become views of it
    (done once: later calls find them packed already)."""
    weights = [m.weight for m in modules]
    first = weights[0]
    offset, contiguous = first.storage_offset(), True
    for w in weights:
        if w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or w.storage_offset() != offset:
            contiguous = False
            break
        offset += w.numel()
    if contiguous and all(w.is_contiguous() for w in weights):
        rows = sum(w.shape[0] for w in weights)
        packed = first.as_strided((rows, first.shape[1]), (first.shape[1], 1), first.storage_offset())
    else:
        packed = torch.cat([w.detach() for w in weights])
        start = 0
        for m in modules:
            rows = m.weight.shape[0]
            m.weight = nn.Parameter(packed[start : start + rows], requires_grad=False)
            start += rows
    if all(m.bias is None for m in modules):
        return packed, None
    bias = torch.cat([m.bias if m.bias is not None else packed.new_zeros(m.weight.shape[0]) for m in modules])
    return packed, bias.detach()


class _Layer:
    """One decoder layer's tensors, read from the transformers modules."""

    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.num_heads = attn.q_proj.weight.shape[0] // attn.head_dim
        self.num_kv_heads = attn.k_proj.weight.shape[0] // attn.head_dim
        self.qkv, self.qkv_bias = _packed([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o, self.o_bias = attn.o_proj.weight, attn.o_proj.bias
        self.gate_up, self.gate_up_bias = _packed([mlp.gate_proj, mlp.up_proj])
        self.intermediate = mlp.gate_proj.weight.shape[0]
        self.down, self.down_bias = mlp.down_proj.weight, mlp.down_proj.bias
        self.input_norm = layer.input_layernorm.weight
        self.post_norm = layer.post_attention_layernorm.weight
        self.eps = float(layer.input_layernorm.variance_epsilon)
        if hasattr(attn, "q_norm"):
            q_norm, k_norm = attn.q_norm.weight, attn.k_norm.weight
            self.qk_norm: torch.Tensor | None = torch.cat(
                (q_norm.expand(self.num_heads, -1), k_norm.expand(self.num_kv_heads, -1))
            )
            self.qk_eps = float(attn.q_norm.variance_epsilon)
        else:
            self.qk_norm = None

    def plan(self, plan: KernelPlan) -> None:
        """The products through the plan's kernels (`qkv_op`, `o_op`, `gate_up_op`, `down_op`)."""

        def planned(kind: str, weight: torch.Tensor, bias: torch.Tensor | None) -> PlannedLinear:
            return PlannedLinear(weight, bias, plan.tables.get(kind, {}), kind in plan.columns)

        self.qkv_op = planned("qkv", self.qkv, self.qkv_bias)
        self.o_op = planned("o", self.o, self.o_bias)
        self.gate_up_op = planned("gate_up", self.gate_up, self.gate_up_bias)
        self.down_op = planned("down", self.down, self.down_bias)


class FastTargetSession:
    """`TargetSession`'s interface (forward / crop / keep / length / reset) over the lean forward.

    With `batch_size` > 1 the cache holds that many rows, each with its own length, and `forward_rows` runs one
    ragged step for all of them (batched decoding); the single-sequence methods then read row 0.
    """

    def __init__(self, target: FrozenTarget, batch_size: int = 1) -> None:
        problem = fast_path_problem(target)
        if problem is not None:
            raise ValueError(f"the lean forward does not support this target: {problem}")
        self.target = target
        self.model = target.model
        decoder = target.decoder
        self.decoder = decoder
        self.layers = [_Layer(layer) for layer in decoder.layers]
        first = decoder.layers[0].self_attn
        self.head_dim = int(first.head_dim)
        self.scaling = float(first.scaling)
        weight = decoder.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.final_norm = target.final_norm.weight
        self.final_eps = float(target.final_norm.variance_epsilon)
        self.lm_head = target.lm_head
        self.kernel_plan = plan_for(self.planned_weights(), report=progress_line)
        for layer in self.layers:
            layer.plan(self.kernel_plan)
        head = self.lm_head
        self.head_op = PlannedLinear(
            head.weight, head.bias, self.kernel_plan.tables.get("lm_head", {}), "lm_head" in self.kernel_plan.columns
        )
        # Where the products have a plan (a large model on the CPU) and run in float32, the per-layer glue runs
        # natively too: an RMSNorm is ~8 small torch ops, the rotary embedding and the cache writes ~8 more.
        self.native_glue = native_glue_fits(self.kernel_plan, self.dtype)
        self.norm = native.rms_norm if self.native_glue else _rms_norm
        self.batch_size = batch_size
        self.capacity = 0
        self.cos = self.sin = torch.empty(0)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths = [0] * batch_size  # cached positions per row
        self._grow(_INITIAL_CAPACITY)

    def planned_weights(self) -> dict[str, list[torch.Tensor]]:
        """Each kind of product's row-major weights, one per layer (what `kernels.plan_for` times)."""
        return {
            "qkv": [layer.qkv for layer in self.layers],
            "o": [layer.o for layer in self.layers],
            "gate_up": [layer.gate_up for layer in self.layers],
            "down": [layer.down for layer in self.layers],
            "lm_head": [self.lm_head.weight],
        }

    def reset(self, batch_size: int | None = None) -> None:
        """Forget every row; `batch_size` (batched decoding) re-shapes the cache for that many rows."""
        if batch_size is not None and batch_size != self.batch_size:
            capacity, self.batch_size = self.capacity, batch_size
            self.keys, self.values, self.capacity = [], [], 0
            self.lengths = [0] * batch_size
            self._grow(capacity)
        self.lengths = [0] * self.batch_size

    @property
    def length(self) -> int:
        return self.lengths[0]

    def crop(self, length: int) -> None:
        """Keep the first `length` positions."""
        self.lengths[0] = min(self.lengths[0], length)

    def keep(self, base: int, rows: list[int]) -> None:
        """After a tree verify: keep the first `base` positions and then only the tree `rows` (the accepted path)."""
        index = torch.tensor(rows, device=self.device) + base
        for cache in (*self.keys, *self.values):
            cache[:, :, base : base + len(rows)] = cache.index_select(2, index)
        self.lengths[0] = base + len(rows)

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these batch rows, in this order (finished rows leave a batched generation)."""
        index = torch.tensor(rows, device=self.device, dtype=torch.long)
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.lengths = [self.lengths[row] for row in rows]
        self.batch_size = len(rows)

    def _grow(self, needed: int) -> None:
        capacity = max(_INITIAL_CAPACITY, self.capacity)
        while capacity < needed:
            capacity *= 2
        if capacity == self.capacity:
            return
        positions = torch.arange(capacity, device=self.device).unsqueeze(0)
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = self.decoder.rotary_emb(probe, positions)  # cast to the model dtype, attention scaling applied
        self.cos, self.sin = cos[0], sin[0]
        shapes = [(self.batch_size, layer.num_kv_heads, capacity, self.head_dim) for layer in self.layers]
        kwargs = {"dtype": self.dtype, "device": self.device}
        old_keys, old_values, used = self.keys, self.values, max(self.lengths)
        self.keys = [torch.zeros(shape, **kwargs) for shape in shapes]
        self.values = [torch.zeros(shape, **kwargs) for shape in shapes]
        for new, old in zip((*self.keys, *self.values), (*old_keys, *old_values), strict=False):
            new[:, :, :used] = old[:, :, :used]
        self.capacity = capacity

    @torch.no_grad()
    def forward(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run `tokens` [1, n] after the cached prefix: (logits [n, V], features [1, n, K*H]).

        A boolean `attention_mask` [1, 1, n, cached + n] and `position_ids` [1, n] verify a tree."""
        n = tokens.shape[1]
        start = self.lengths[0]
        end = start + n
        self._grow(end)
        if position_ids is None:
            cos, sin = self.cos[start:end], self.sin[start:end]
        else:
            cos, sin = self.cos[position_ids[0]], self.sin[position_ids[0]]
        if attention_mask is not None:
            mask = attention_mask
        elif n > 1:
            mask = torch.ones(n, end, dtype=torch.bool, device=self.device).tril(start)
        else:
            mask = None

        def store(index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = self.keys[index], self.values[index]
            keys[:1, :, start:end] = k
            values[:1, :, start:end] = v
            return keys[:1, :, :end], values[:1, :, :end]

        def native_attend(index: int, layer: _Layer, qkv: torch.Tensor, qk: torch.Tensor) -> torch.Tensor:
            keys, values = self.keys[index], self.values[index]
            v = qkv[:, :, layer.num_heads + layer.num_kv_heads :]
            q = native.rotary_store(qk, v, cos, sin, keys, values, start)
            if n <= NATIVE_ATTENTION_TOKENS and (mask is None or mask.dtype == torch.bool):
                return native.attention(q, keys, values, mask, end, self.scaling)
            return self._attention(q, keys[:1, :, :end], values[:1, :, :end], mask)

        if self.native_glue:
            attend = native_attend
        else:
            attend = self._torch_attend(cos.unsqueeze(0), sin.unsqueeze(0), store, mask)
        logits, features = self._run(tokens, attend)
        self.lengths[0] = end
        return logits[0], features

    @torch.no_grad()
    def forward_rows(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One ragged step for every row: row b's `tokens[b]` [W] go after ITS cached prefix (causally), whatever
        the other rows' lengths. Returns (logits [B, W, V], features [B, W, K*H]).

        The lengths do not move: the caller says with `lengths[b] = ...` how many of the written positions each
        row keeps (positions past a row's length are never attended to and get overwritten later)."""
        rows, width = tokens.shape
        starts = torch.tensor(self.lengths, device=self.device)
        positions = starts[:, None] + torch.arange(width, device=self.device)  # [B, W]
        end = max(self.lengths) + width
        self._grow(end)
        mask = (torch.arange(end, device=self.device) <= positions[:, :, None]).unsqueeze(1)  # [B, 1, W, end]
        scatter: dict[int, torch.Tensor] = {}

        def store(index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = self.keys[index], self.values[index]
            if k.shape[1] not in scatter:
                scatter[k.shape[1]] = positions[:, None, :, None].expand(rows, k.shape[1], width, self.head_dim)
            keys.scatter_(2, scatter[k.shape[1]], k)
            values.scatter_(2, scatter[v.shape[1]], v)
            return keys[:, :, :end], values[:, :, :end]

        return self._run(tokens, self._torch_attend(self.cos[positions], self.sin[positions], store, mask))

    def _attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask) -> torch.Tensor:
        """torch's attention of `q` [B, heads, W, head_dim] over `keys` / `values`: [B, W, heads * head_dim]."""
        rows, heads, width, _ = q.shape
        grouped = heads != keys.shape[1]
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=grouped)
        return attn.transpose(1, 2).reshape(rows, width, -1)

    def _torch_attend(self, cos: torch.Tensor, sin: torch.Tensor, store, mask):
        """`attend` for `_run` by torch ops: rotary tables `cos`/`sin` [B, W, head_dim], `store(layer, keys,
        values)` -> the keys/values to attend over, and the boolean `mask` (None: see everything)."""
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
        half = self.head_dim // 2

        def attend(index: int, layer: _Layer, qkv: torch.Tensor, qk: torch.Tensor) -> torch.Tensor:
            heads = layer.num_heads
            qk = (qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin).transpose(1, 2)
            keys, values = store(index, qk[:, heads:], qkv[:, :, heads + layer.num_kv_heads :].transpose(1, 2))
            return self._attention(qk[:, :heads], keys, values, mask)

        return attend

    def _run(self, tokens, attend) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder over `tokens` [B, W], `attend(index, layer, qkv, qk)` rotating the queries and keys `qk`
        [B, W, heads, head_dim] (`qkv` holds the values after them), storing the new keys and values, and
        returning the attention's output [B, W, heads * head_dim]."""
        rows, n = tokens.shape
        wanted = self.target.target_layer_ids
        last_layer = len(self.layers) - 1
        captured: dict[int, torch.Tensor] = {}
        x = F.embedding(tokens, self.decoder.embed_tokens.weight)
        if -1 in wanted:
            captured[-1] = x
        for index, layer in enumerate(self.layers):
            heads, kv_heads = layer.num_heads, layer.num_kv_heads
            qkv = layer.qkv_op(self.norm(x, layer.input_norm, layer.eps))
            qkv = qkv.view(rows, n, heads + 2 * kv_heads, self.head_dim)
            qk = qkv[:, :, : heads + kv_heads]
            if layer.qk_norm is not None:
                qk = _rms_norm(qk, None, layer.qk_eps)
                qk = layer.qk_norm * qk if qk.dtype != torch.float32 else qk * layer.qk_norm
            x = x + layer.o_op(attend(index, layer, qkv, qk))
            gate_up = layer.gate_up_op(self.norm(x, layer.post_norm, layer.eps))
            hidden = F.silu(gate_up[..., : layer.intermediate]) * gate_up[..., layer.intermediate :]
            x = x + layer.down_op(hidden)
            if index in wanted and index != last_layer:
                captured[index] = x
        x = self.norm(x, self.final_norm, self.final_eps)
        selected = [x if i == last_layer else captured[i] for i in wanted]
        features = torch.cat(selected, dim=-1) if selected else x.new_zeros(rows, n, 0)
        return self.head_op(x), features
