"""EAGLE-1 / EAGLE-2 draft (arXiv 2401.15077), keys in the SafeAILab EAGLE layout (the method's paper).

The draft extrapolates features: ``h = fc(cat(embed(x_{t+1}), f_t))`` (fc: 2H -> H, with bias), then N causal
Llama decoder layers (default 1) and a final ``norm``; the result regresses ``f_{t+1}``, the target's post-norm
last hidden state, and the TARGET's lm_head turns it into logits (passed to ``compute_logits``; the draft owns
no lm_head). EAGLE-2 is this draft with a dynamic tree at decode time; it trains identically.

On disk (safetensors), following SafeAILab's ``cnets``: ``embed_tokens.weight`` [V, H] (a frozen copy of the
target's, saved), ``fc.weight`` [H, 2H], ``fc.bias`` [H], ``layers.{i}.self_attn.{q,k,v,o}_proj.weight``,
``layers.{i}.mlp.{gate,up,down}_proj.weight``, ``layers.{i}.post_attention_layernorm.weight``, and
``layers.{i}.input_layernorm.weight`` for i >= 1 only (SafeAILab feeds the fc output to layer 0 unnormed).
``norm.weight`` is the EAGLE paper's final norm; SafeAILab checkpoints have none (``final_norm=False`` reads them).
"""

from __future__ import annotations

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
    text_config,
)

EAGLE_ARCHITECTURE = "LlamaForCausalLMEagle"


class EagleDraftConfig(LlamaConfig):
    """Llama config of an EAGLE-1/2 draft. ``fc_bias`` and ``final_norm`` select the SafeAILab variants."""

    num_target_layers: int | None = None
    fc_bias: bool = True
    final_norm: bool = True

    def validate_architecture(self) -> None:
        """head_dim is explicit, so hidden_size need not be a multiple of the head count."""

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["tie_word_embeddings"] = False
        return ecosystem_dict(out, EAGLE_ARCHITECTURE)

    @classmethod
    def from_target(cls, target_config: Any, *, num_draft_layers: int = 1, **overrides: Any) -> EagleDraftConfig:
        """Draft config for a target. ``overrides`` may change heads, kv heads, head_dim and intermediate_size;
        the width must stay H because the draft concatenates H-wide embeddings and regresses H-wide features."""
        fields = draft_fields_from_target(target_config)
        if overrides.get("hidden_size", fields["hidden_size"]) != fields["hidden_size"]:
            raise SpectoolError(
                f"an EAGLE-1 draft must be as wide as its target (hidden_size {fields['hidden_size']}): it "
                "regresses the target's features"
            )
        fields.update(overrides)
        cfg = text_config(target_config)
        return cls(
            **fields,
            num_hidden_layers=num_draft_layers,
            tie_word_embeddings=False,
            pad_token_id=getattr(cfg, "pad_token_id", None),
            bos_token_id=getattr(cfg, "bos_token_id", None),
            eos_token_id=getattr(cfg, "eos_token_id", None),
        )


class EagleDecoderLayer(nn.Module):
    """A causal Llama decoder layer; layer 0 has no input norm (SafeAILab)."""

    def __init__(self, config: EagleDraftConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = AttentionProjections(config)
        self.mlp = GatedMLP(config)
        if layer_idx != 0:
            self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: DraftKVCache | None,
    ) -> torch.Tensor:
        x = self.input_layernorm(hidden) if self.layer_idx != 0 else hidden
        attn = self.self_attn
        q = apply_rotary(attn.query(x), *cos_sin)
        k, v = attn.key_value(x)
        k = apply_rotary(k, *cos_sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if mask is None or mask.dim() == 2:
            mask = causal_mask(x.shape[1], k.shape[2], x.device, mask)
        hidden = hidden + attn.output(attend(q, k, v, mask, attn.scaling))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaEagleDraftModel(DraftModelMixin, PreTrainedModel):
    """EAGLE-1/2 draft model; see the module docstring for the architecture and the on-disk keys."""

    config_class = EagleDraftConfig
    config: EagleDraftConfig
    base_model_prefix = ""
    _no_split_modules: ClassVar[list[str]] = ["EagleDecoderLayer"]
    frozen_parameter_prefixes: ClassVar[tuple[str, ...]] = ("embed_tokens.",)

    def __init__(self, config: EagleDraftConfig) -> None:
        super().__init__(config)
        hidden = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.fc = nn.Linear(2 * hidden, hidden, bias=config.fc_bias)
        self.layers = nn.ModuleList(EagleDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        if config.final_norm:
            self.norm = RMSNorm(hidden, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.post_init()
        self.freeze_target_copies()

    @torch.no_grad()
    def copy_target_embeddings(self, target: nn.Module) -> None:
        """Copy the target's token embedding into the draft's frozen ``embed_tokens``."""
        weight = target.get_input_embeddings().weight
        if weight.shape != self.embed_tokens.weight.shape:
            raise SpectoolError(
                f"target embeddings {tuple(weight.shape)} do not fit the draft's {tuple(self.embed_tokens.weight.shape)}"
            )
        self.embed_tokens.weight.copy_(weight.to(self.embed_tokens.weight))
        self.freeze_target_copies()

    def new_cache(self) -> DraftKVCache:
        return DraftKVCache(num_layers=self.config.num_hidden_layers)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        hidden_states: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: DraftKVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted features ``f_{t+1}`` ``[B, L, H]`` from tokens x_{t+1} and features ``hidden_states`` f_t.

        Training adds the U(-0.1, 0.1) feature noise before calling. ``past_key_values`` appends (crop after
        verification); ``attention_mask`` as in EAGLE-3: None causal, ``[B, kv]`` padding, ``[B, 1, L, kv]``
        explicit (the EAGLE-2 tree).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        hidden = self.fc(torch.cat((embeds.to(hidden_states.dtype), hidden_states), dim=-1))
        batch, length = hidden.shape[:2]
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(past, past + length, device=hidden.device)
        position_ids = position_ids.expand(batch, length)
        cos_sin = self.rotary_emb(position_ids, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, cos_sin, attention_mask, past_key_values)
        return self.norm(hidden) if self.config.final_norm else hidden

    @staticmethod
    def compute_logits(hidden_states: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """Logits of predicted features through the TARGET's lm_head (not owned by the draft)."""
        return lm_head(hidden_states)
