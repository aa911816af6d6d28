"""EAGLE-3 draft (arXiv 2503.01840), saved in the SGLang / vLLM / SpecForge layout.

The draft fuses three target layers (low, mid, high) into one feature ``g = fc(cat(f_low, f_mid, f_high))`` and
runs ONE decoder layer (``midlayer``) whose attention input is ``cat(input_layernorm(embed(x)), hidden_norm(g))``
(width 2H into q/k/v) with residual ``g``; then MLP, ``norm`` and ``lm_head`` over the (possibly pruned) draft
vocabulary. Position t reads feature t and token x_{t+1} and predicts x_{t+2}.

Training-time test (TTT): step 0 is teacher-forced with a causal mask; step i feeds the draft its own step i-1
output (pre-norm) as the hidden input, reads tokens shifted i more positions, and attends causally over the step-0
keys PLUS the diagonal keys of steps 1..i at its own position; rotary positions shift by i.

On disk (safetensors): ``fc.weight`` [H, K*H_target], ``midlayer.self_attn.{q,k,v,o}_proj.weight`` (q/k/v
in_features 2H; ``.bias`` too when the target has attention_bias), ``midlayer.mlp.{gate,up,down}_proj.weight``,
``midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight``, ``norm.weight``, ``lm_head.weight``
[draft_vocab, H], and ``d2t`` int64 [draft_vocab] / ``t2d`` bool [V] only when the vocabulary is pruned.
The token embedding is the target's: engines reuse it, so it is NOT saved. The draft holds a reference to it
(``attach_target_embeddings``), outside the module tree. Only when the draft width differs from the target's does
the draft own a trainable ``embed_tokens.weight`` [V, H] (saved; engines load it when present).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import LlamaConfig, PreTrainedModel

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
    causal_mask,
    draft_fields_from_target,
    ecosystem_dict,
    repeat_kv,
    text_config,
)

EAGLE3_ARCHITECTURE = "LlamaForCausalLMEagle3"


class Eagle3DraftConfig(LlamaConfig):
    """Llama config of an EAGLE-3 draft; ``config.json`` is what SGLang/vLLM read (the published checkpoint layouts).

    ``target_layer_ids`` (output-of-layer ids) is written as ``eagle_config.eagle_aux_hidden_state_layer_ids`` (SGLang
    adds 1 when capturing; ``spectool.checkpoint.save_draft`` also writes vLLM's top-level
    ``eagle_aux_hidden_state_layer_ids``, id + 1, which is read back when the nested key is absent);
    ``target_hidden_size`` is written only when it differs from ``hidden_size``.
    """

    draft_vocab_size: int | None = None
    target_hidden_size: int | None = None
    target_layer_ids: list[int] | None = None
    num_target_layers: int | None = None
    eagle_config: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if isinstance(self.eagle_config, dict) and self.target_layer_ids is None:
            ids = self.eagle_config.get("eagle_aux_hidden_state_layer_ids")
            self.target_layer_ids = list(ids) if ids else None
        # vLLM's key: top-level, in its numbering (spectool id + 1); read when SGLang's nested one is absent.
        vllm_ids = kwargs.pop("eagle_aux_hidden_state_layer_ids", None)
        if self.target_layer_ids is None and vllm_ids:
            self.target_layer_ids = [int(i) - 1 for i in vllm_ids]
        self.eagle_config = None
        super().__post_init__(**kwargs)
        if self.draft_vocab_size is None:
            self.draft_vocab_size = self.vocab_size
        if self.target_hidden_size == self.hidden_size:
            self.target_hidden_size = None

    def validate_architecture(self) -> None:
        """head_dim is explicit, so hidden_size need not be a multiple of the head count (unlike plain Llama)."""

    @property
    def feature_hidden_size(self) -> int:
        """Width H_target of one captured target layer."""
        return self.target_hidden_size or self.hidden_size

    @property
    def num_feature_layers(self) -> int:
        return len(self.target_layer_ids) if self.target_layer_ids else 3

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["eagle_config"] = {
            "eagle_aux_hidden_state_layer_ids": list(self.target_layer_ids or []),
            "use_aux_hidden_state": True,
        }
        out["num_hidden_layers"] = 1
        out["tie_word_embeddings"] = False
        drop = ["target_layer_ids"] + (["target_hidden_size"] if self.target_hidden_size is None else [])
        return ecosystem_dict(out, EAGLE3_ARCHITECTURE, drop=drop)

    @classmethod
    def from_target(
        cls,
        target_config: Any,
        *,
        target_layer_ids: Sequence[int],
        draft_vocab_size: int | None = None,
        **overrides: Any,
    ) -> Eagle3DraftConfig:
        """Draft config for a target: its attention/MLP/rope settings, one midlayer, the given feature layers.

        ``overrides`` may change the draft's own shape (hidden_size, heads, kv heads, head_dim,
        intermediate_size); head_dim stays the target's unless given; the fc input stays K * H_target.
        """
        fields = draft_fields_from_target(target_config)
        target_hidden = fields["hidden_size"]
        fields.update(overrides)
        if draft_vocab_size is not None and not 0 < draft_vocab_size <= fields["vocab_size"]:
            raise SpectoolError(
                f"draft_vocab_size must be in [1, {fields['vocab_size']}] (the target vocabulary), got "
                f"{draft_vocab_size}"
            )
        cfg = text_config(target_config)
        return cls(
            **fields,
            num_hidden_layers=1,
            tie_word_embeddings=False,
            draft_vocab_size=draft_vocab_size or fields["vocab_size"],
            target_hidden_size=target_hidden,
            target_layer_ids=list(target_layer_ids),
            pad_token_id=getattr(cfg, "pad_token_id", None),
            bos_token_id=getattr(cfg, "bos_token_id", None),
            eos_token_id=getattr(cfg, "eos_token_id", None),
        )


@dataclass
class Eagle3Output:
    """One forward of the draft: ``hidden_states`` is the midlayer output before ``norm`` (what the next step
    consumes), ``logits`` are over the draft vocabulary."""

    hidden_states: torch.Tensor
    logits: torch.Tensor


@dataclass
class Eagle3TTTOutput:
    """Per-step outputs of the training-time-test unroll; index i is step i."""

    hidden_states: list[torch.Tensor]
    logits: list[torch.Tensor]  # empty with return_logits=False


class Eagle3DecoderLayer(nn.Module):
    """The single EAGLE-3 decoder layer (``midlayer``): 2H-wide attention input, H-wide residual stream."""

    def __init__(self, config: Eagle3DraftConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.self_attn = AttentionProjections(config, input_size=2 * hidden)
        self.mlp = GatedMLP(config)
        self.input_layernorm = RMSNorm(hidden, eps=config.rms_norm_eps)
        self.hidden_norm = RMSNorm(hidden, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps=config.rms_norm_eps)

    def attention_input(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """``cat(input_layernorm(embed(x)), hidden_norm(g))``: embeddings first, as SGLang/vLLM expect."""
        return torch.cat((self.input_layernorm(embeds), self.hidden_norm(hidden)), dim=-1)

    def finish(self, residual: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Residual add, then the MLP block."""
        hidden = residual + attn_out
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaEagle3DraftModel(DraftModelMixin, PreTrainedModel):
    """EAGLE-3 draft model; see the module docstring for the architecture and the on-disk keys."""

    config_class = Eagle3DraftConfig
    config: Eagle3DraftConfig
    base_model_prefix = ""
    _no_split_modules: ClassVar[list[str]] = ["Eagle3DecoderLayer"]

    def __init__(self, config: Eagle3DraftConfig) -> None:
        super().__init__(config)
        if config.num_hidden_layers != 1:
            raise SpectoolError(
                f"the EAGLE-3 format holds exactly one decoder layer (midlayer), got num_hidden_layers="
                f"{config.num_hidden_layers}"
            )
        hidden, vocab, draft_vocab = config.hidden_size, config.vocab_size, config.draft_vocab_size
        self.fc = nn.Linear(config.num_feature_layers * config.feature_hidden_size, hidden, bias=False)
        self.midlayer = Eagle3DecoderLayer(config)
        self.norm = RMSNorm(hidden, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, draft_vocab, bias=False)
        self.rotary_emb = RotaryEmbedding(config)
        if draft_vocab < vocab:
            self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.long))
            t2d = torch.zeros(vocab, dtype=torch.bool)
            t2d[:draft_vocab] = True
            self.register_buffer("t2d", t2d)
        if config.target_hidden_size is not None:
            # The target's embeddings are H_target wide and cannot feed an H-wide draft: own a trainable table.
            self.embed_tokens = nn.Embedding(vocab, hidden)
        self.post_init()

    # -- embeddings ------------------------------------------------------------------------------------

    @property
    def owns_embeddings(self) -> bool:
        return self.config.target_hidden_size is not None

    def attach_target_embeddings(self, embeddings: nn.Embedding) -> None:
        """Use the target's (frozen) token embedding at run time without making it part of this model's state."""
        if self.owns_embeddings:
            raise SpectoolError(
                "this EAGLE-3 draft is narrower/wider than its target and owns its embeddings; nothing to attach"
            )
        expected = (self.config.vocab_size, self.config.hidden_size)
        if tuple(embeddings.weight.shape) != expected:
            raise SpectoolError(
                f"target embeddings have shape {tuple(embeddings.weight.shape)}, the draft expects {expected}"
            )
        # object.__setattr__ keeps it out of the module tree: not saved, not moved, not trained by the draft.
        object.__setattr__(self, "_target_embeddings", embeddings)

    def get_input_embeddings(self) -> nn.Module | None:
        if self.owns_embeddings:
            return self.embed_tokens
        return self.__dict__.get("_target_embeddings")

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeddings = self.get_input_embeddings()
        if embeddings is None:
            raise SpectoolError(
                "the EAGLE-3 draft has no token embeddings: call draft.attach_target_embeddings("
                "target.get_input_embeddings()) first"
            )
        return embeddings(input_ids.to(embeddings.weight.device)).to(self.fc.weight)

    # -- vocabulary mapping ------------------------------------------------------------------------------

    @property
    def pruned_vocab(self) -> bool:
        return self.config.draft_vocab_size < self.config.vocab_size

    def set_vocab_mapping(self, target_ids: torch.Tensor) -> None:
        """Keep these target token ids (the most frequent supervised ones) as the draft vocabulary.

        Writes ``d2t[draft_id] = target_id - draft_id`` and ``t2d`` membership; ids are sorted first.
        """
        if not self.pruned_vocab:
            raise SpectoolError("the draft vocabulary equals the target's; there is no mapping to set")
        ids = torch.as_tensor(target_ids, dtype=torch.long).flatten().sort().values.to(self.d2t.device)
        if ids.numel() != self.config.draft_vocab_size or ids.unique().numel() != ids.numel():
            raise SpectoolError(
                f"expected {self.config.draft_vocab_size} distinct target ids, got {ids.numel()} "
                f"({ids.unique().numel()} distinct)"
            )
        self.d2t.copy_(ids - torch.arange(ids.numel(), device=ids.device))
        self.t2d.zero_()
        self.t2d[ids] = True

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """``target_id = draft_id + d2t[draft_id]`` (identity when the vocabulary is not pruned)."""
        if not self.pruned_vocab:
            return draft_ids
        return draft_ids + self.d2t[draft_ids]

    @torch.no_grad()
    def init_lm_head_from_target(self, target_lm_head_weight: torch.Tensor) -> None:
        """Start ``lm_head`` from the target's rows of the kept tokens (needs draft width == target width)."""
        if self.owns_embeddings:
            raise SpectoolError("lm_head can only be copied from the target when the widths match")
        rows = self.draft_to_target(torch.arange(self.config.draft_vocab_size, device=target_lm_head_weight.device))
        self.lm_head.weight.copy_(target_lm_head_weight[rows].to(self.lm_head.weight))

    # -- forward ---------------------------------------------------------------------------------------

    def fuse_target_features(self, target_hidden_states: torch.Tensor) -> torch.Tensor:
        """``g = fc(cat(f_low, f_mid, f_high))``: ``[B, S, K*H_target] -> [B, S, H]``."""
        return self.fc(target_hidden_states.to(self.fc.weight.dtype))

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits from pre-norm midlayer outputs."""
        return self.lm_head(self.norm(hidden_states))

    def _qkv(
        self, embeds: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = self.midlayer.self_attn
        x = self.midlayer.attention_input(embeds, hidden)
        q = attn.query(x)
        k, v = attn.key_value(x)
        cos, sin = self.rotary_emb(position_ids, q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        hidden_states: torch.Tensor | None = None,
        target_hidden_states: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: DraftKVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> Eagle3Output:
        """One draft step over L new positions (decoding, or a plain teacher-forced pass).

        Give exactly one of ``target_hidden_states`` (``[B, L, K*H_target]``, fused by ``fc``) or
        ``hidden_states`` (``[B, L, H]``, the draft's own previous output), and one of ``input_ids`` /
        ``inputs_embeds``. With ``past_key_values`` the new keys are appended to the cache (crop it after
        verification). ``attention_mask``: None = causal over ``[cache | new]``; ``[B, cached + L]`` = causal
        plus key padding; a boolean ``[B, 1, L, cached + L]`` is used as is (tree attention).
        """
        if (hidden_states is None) == (target_hidden_states is None):
            raise ValueError("give exactly one of hidden_states or target_hidden_states")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        hidden = self.fuse_target_features(target_hidden_states) if hidden_states is None else hidden_states
        embeds = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = hidden.shape[:2]
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(past, past + length, device=hidden.device)
        position_ids = position_ids.expand(batch, length)
        q, k, v = self._qkv(embeds, hidden, position_ids)
        if past_key_values is not None:
            k, v = past_key_values.update(0, k, v)
        if (attention_mask is not None and attention_mask.dim() == 2) or (attention_mask is None and length > 1):
            attention_mask = causal_mask(length, k.shape[2], hidden.device, attention_mask)
        # (one new position with no mask: it is the last one and may see every cached key)
        attn = self.midlayer.self_attn
        out = self.midlayer.finish(hidden, attn.output(attend(q, k, v, attention_mask, attn.scaling)))
        return Eagle3Output(hidden_states=out, logits=self.compute_logits(out))

    def new_cache(self) -> DraftKVCache:
        return DraftKVCache(num_layers=1)

    def ttt_forward(
        self,
        input_ids: torch.Tensor,
        target_hidden_states: torch.Tensor,
        *,
        ttt_steps: int,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> Eagle3TTTOutput:
        """The training-time-test unroll over ``ttt_steps`` steps (``return_logits=False`` leaves the vocabulary
        projection to the caller, which may need it at a few positions only).

        ``input_ids`` ``[B, S]`` holds x_{t+1} at position t (already shifted once, as the method's paper does) and
        ``target_hidden_states`` ``[B, S, K*H_target]`` holds feature t. Step i reads ``input_ids`` shifted left
        by i more positions (the tail is padded with id 0; those positions must be masked out of the loss).
        ``attention_mask`` ``[B, S]`` (1 = real) hides padded keys; a boolean ``[B, 1, S, S]`` mask (True = may
        attend) replaces step 0's causal mask instead, e.g. per-document causal attention in packed rows.
        """
        if ttt_steps < 1:
            raise ValueError("ttt_steps must be >= 1")
        batch, seq = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device)
        position_ids = position_ids.expand(batch, seq)
        attn = self.midlayer.self_attn
        if attention_mask is not None and attention_mask.dim() == 4:
            step0_mask = attention_mask.bool()
        else:
            step0_mask = causal_mask(seq, seq, input_ids.device, attention_mask)
        hidden = self.fuse_target_features(target_hidden_states)
        step_keys: list[torch.Tensor] = []
        step_values: list[torch.Tensor] = []
        outputs: list[torch.Tensor] = []
        for step in range(ttt_steps):
            ids = input_ids if step == 0 else torch.cat((input_ids[:, step:], input_ids.new_zeros(batch, step)), 1)
            q, k, v = self._qkv(self.embed(ids), hidden, position_ids + step)
            step_keys.append(repeat_kv(k, attn.num_groups))
            step_values.append(repeat_kv(v, attn.num_groups))
            out = self._ttt_attention(q, step_keys, step_values, step0_mask, attn.scaling)
            hidden = self.midlayer.finish(hidden, attn.output(out))
            outputs.append(hidden)
        logits = [self.compute_logits(h) for h in outputs] if return_logits else []
        return Eagle3TTTOutput(hidden_states=outputs, logits=logits)

    @staticmethod
    def _ttt_attention(
        q: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        step0_mask: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        """Attention of step ``len(keys) - 1``: causal over step-0 keys, plus each later step's key at the same
        position (a diagonal), in one softmax."""
        causal_scores = torch.matmul(q, keys[0].transpose(-1, -2)) * scaling
        causal_scores = causal_scores.masked_fill(~step0_mask, torch.finfo(causal_scores.dtype).min)
        diagonal_scores = [(q * k).sum(-1, keepdim=True) * scaling for k in keys[1:]]
        probs = torch.softmax(torch.cat([causal_scores, *diagonal_scores], dim=-1).float(), dim=-1).to(q.dtype)
        seq = keys[0].shape[2]
        out = torch.matmul(probs[..., :seq], values[0])
        for j, v in enumerate(values[1:]):
            out = out + probs[..., seq + j : seq + j + 1] * v
        return out


class GptOssEagle3DraftModel(LlamaEagle3DraftModel):
    """EAGLE-3 draft for gpt-oss targets: the same draft and on-disk format, with the target's YaRN rotary.

    The rope settings are copied from the target like for any target; this class exists so the registry can
    name it and so a gpt-oss draft built without YaRN fails loudly.
    """

    def __init__(self, config: Eagle3DraftConfig) -> None:
        rope_type = (config.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "yarn":
            raise SpectoolError(f"a gpt-oss EAGLE-3 draft needs the target's YaRN rope, got rope_type={rope_type!r}")
        super().__init__(config)
