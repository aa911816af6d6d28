"""DSpark draft (arXiv 2607.05147), DeepSpec layout.

DSpark keeps the DFlash backbone and block mask but makes the anchor slot a prediction: slot k (0-based) of a
block ``[x_a, MASK x (B-1)]`` predicts x_{a+k+1}, so a block of B yields B draft tokens. On top of the target's
lm_head it adds two small heads:

* a low-rank Markov head, ``bias_k = markov_w2(markov_w1[prev_k])`` with prev_0 = the anchor and prev_k the token
  before slot k (ground truth in training, the draft's own choice left to right at decode), added to the logits;
* a confidence head, ``proj(cat(h_k, markov_w1[prev_k]))``, the logit of "slot k is accepted given the earlier
  slots were", which a prefix scheduler uses to decide how many drafts to verify.

The draft owns FROZEN copies of the target's ``embed_tokens`` and ``lm_head`` (saved in the checkpoint).
On disk: the DFlash keys plus ``embed_tokens.weight`` [V, H], ``lm_head.weight`` [V, H],
``markov_head.markov_w1.weight`` [V, r], ``markov_head.markov_w2.weight`` [V, r], ``confidence_head.proj.weight``
[1, H + r] and ``confidence_head.proj.bias`` [1]. config.json: a Qwen3 config with
``"architectures": ["Qwen3DSparkModel"]`` and the DSpark fields at top level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel, Qwen3Config

from spectool.errors import SpectoolError

from .common import DraftKVCache, DraftModelMixin, ecosystem_dict
from .dflash import BlockDiffusionBackbone, BlockDraftConfigMixin

DSPARK_ARCHITECTURE = "Qwen3DSparkModel"
MARKOV_HEAD_TYPES = ("vanilla",)


class DSparkDraftConfig(BlockDraftConfigMixin, Qwen3Config):
    """Qwen3 config of a DSpark draft with the DeepSpec fields at top level (the published checkpoint layouts)."""

    block_size: int = 7
    mask_token_id: int | None = None
    target_layer_ids: list[int] | None = None
    num_target_layers: int | None = None
    num_anchors: int = 512
    markov_rank: int = 256
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True

    def to_dict(self) -> dict[str, Any]:
        return ecosystem_dict(super().to_dict(), DSPARK_ARCHITECTURE)

    @classmethod
    def from_target(
        cls,
        target_config: Any,
        *,
        target_layer_ids: Sequence[int],
        num_draft_layers: int | None = None,
        block_size: int = 7,
        mask_token_id: int | None = None,
        markov_rank: int = 256,
        **overrides: Any,
    ) -> DSparkDraftConfig:
        """Draft config for a target; ``num_draft_layers`` defaults to the number of feature layers K.
        ``overrides`` may change heads, kv heads, head_dim, intermediate_size and the DSpark head settings
        (the width must stay H)."""
        if markov_rank < 1:
            raise SpectoolError(f"markov_rank must be positive, got {markov_rank}")
        head_settings = {
            key: overrides.pop(key)
            for key in ("num_anchors", "markov_head_type", "enable_confidence_head", "confidence_head_with_markov")
            if key in overrides
        }
        fields = cls._block_fields(
            target_config,
            target_layer_ids=target_layer_ids,
            num_draft_layers=num_draft_layers or len(target_layer_ids),
            block_size=block_size,
            mask_token_id=mask_token_id,
            overrides=overrides,
            method="DSpark",
        )
        return cls(**fields, markov_rank=markov_rank, **head_settings)


class MarkovHead(nn.Module):
    """Low-rank first-order Markov logit bias: ``markov_w2(markov_w1[prev])``."""

    def __init__(self, vocab_size: int, rank: int) -> None:
        super().__init__()
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, vocab_size, bias=False)

    def forward(self, prev_tokens: torch.Tensor) -> torch.Tensor:
        return self.markov_w2(self.markov_w1(prev_tokens))


class ConfidenceHead(nn.Module):
    """Acceptance logit of a slot from its hidden state (and, optionally, the Markov code of its prev token)."""

    def __init__(self, hidden_size: int, rank: int, with_markov: bool) -> None:
        super().__init__()
        self.with_markov = with_markov
        self.proj = nn.Linear(hidden_size + (rank if with_markov else 0), 1)

    def forward(self, hidden: torch.Tensor, prev_code: torch.Tensor | None) -> torch.Tensor:
        features = torch.cat((hidden, prev_code), dim=-1) if self.with_markov else hidden
        return self.proj(features).squeeze(-1)


@dataclass
class DSparkBlockDraft:
    """A block drafted left to right: ``tokens`` [B, n], the ``logits`` [B, n, V] each token was drawn from
    (lm_head + Markov bias, before temperature), and the ``confidence_logits`` [B, n] (None without the head)."""

    tokens: torch.Tensor
    logits: torch.Tensor
    confidence_logits: torch.Tensor | None


def teacher_forced_prev_tokens(
    input_ids: torch.Tensor, anchor_positions: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Ground-truth previous tokens ``[B, A * block_size]``: slot k of the block at anchor a gets x_{a+k}
    (positions past the sequence end are clamped; mask them out of the loss)."""
    offsets = torch.arange(block_size, device=anchor_positions.device)
    positions = (anchor_positions[..., None] + offsets).clamp(max=input_ids.shape[1] - 1).flatten(1)
    return input_ids.gather(1, positions)


class Qwen3DSparkModel(BlockDiffusionBackbone, DraftModelMixin, PreTrainedModel):
    """DSpark draft model; see the module docstring for the architecture and the on-disk layout."""

    config_class = DSparkDraftConfig
    config: DSparkDraftConfig
    base_model_prefix = ""
    _no_split_modules: ClassVar[list[str]] = ["DFlashDecoderLayer"]
    frozen_parameter_prefixes: ClassVar[tuple[str, ...]] = ("embed_tokens.", "lm_head.")

    def __init__(self, config: DSparkDraftConfig) -> None:
        super().__init__(config)
        if config.markov_head_type not in MARKOV_HEAD_TYPES:
            raise SpectoolError(
                f"markov_head_type {config.markov_head_type!r} is not supported; supported: "
                f"{', '.join(MARKOV_HEAD_TYPES)}"
            )
        self._build_backbone(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.markov_head = MarkovHead(config.vocab_size, config.markov_rank)
        if config.enable_confidence_head:
            self.confidence_head = ConfidenceHead(
                config.hidden_size, config.markov_rank, config.confidence_head_with_markov
            )
        self.post_init()
        self.freeze_target_copies()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    @torch.no_grad()
    def copy_target_weights(self, target: nn.Module) -> None:
        """Copy the target's embedding and lm_head into the draft's frozen copies."""
        for own, theirs in (
            (self.embed_tokens.weight, target.get_input_embeddings().weight),
            (self.lm_head.weight, target.get_output_embeddings().weight),
        ):
            if own.shape != theirs.shape:
                raise SpectoolError(f"target weight {tuple(theirs.shape)} does not fit the draft's {tuple(own.shape)}")
            own.copy_(theirs.to(own))
        self.freeze_target_copies()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        target_hidden: torch.Tensor,
        position_ids: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: DraftKVCache | None = None,
    ) -> torch.Tensor:
        """Draft hidden states ``[B, q, H]`` of block(s) ``input_ids`` (``block_input_ids`` layout), embedded with
        the frozen copy of the target's embedding; arguments as ``Qwen3DFlashDraftModel.forward``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        return self.run_backbone(embeds, target_hidden, position_ids, attention_mask, past_key_values)

    def markov_bias(self, prev_tokens: torch.Tensor) -> torch.Tensor:
        return self.markov_head(prev_tokens)

    def draft_logits(self, hidden_states: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``[..., V]``: ``lm_head(h_k) + markov_w2(markov_w1[prev_k])``."""
        return self.lm_head(hidden_states) + self.markov_bias(prev_tokens)

    def confidence_logits(self, hidden_states: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
        """Acceptance logits ``[...]`` of each slot given its previous token."""
        if not self.config.enable_confidence_head:
            raise SpectoolError("this DSpark draft was built without a confidence head")
        code = self.markov_head.markov_w1(prev_tokens) if self.confidence_head.with_markov else None
        return self.confidence_head(hidden_states, code)

    @torch.no_grad()
    def sample_block(
        self,
        hidden_states: torch.Tensor,
        anchor_tokens: torch.Tensor,
        *,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> DSparkBlockDraft:
        """Draft one block left to right from its hidden states ``[B, n, H]`` and anchors ``[B]``.

        The lm_head logits are computed once; only the Markov bias and the confidence depend on the previous
        token, so each slot costs one rank-r lookup. Greedy at ``temperature == 0``, else sampled.
        """
        base = self.lm_head(hidden_states)
        prev = anchor_tokens
        tokens, logits, confidences = [], [], []
        for k in range(hidden_states.shape[1]):
            slot_logits = base[:, k] + self.markov_bias(prev)
            if self.config.enable_confidence_head:
                confidences.append(self.confidence_logits(hidden_states[:, k], prev))
            if temperature > 0:
                probs = torch.softmax(slot_logits.float() / temperature, dim=-1)
                prev = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                prev = slot_logits.argmax(dim=-1)
            tokens.append(prev)
            logits.append(slot_logits)
        return DSparkBlockDraft(
            tokens=torch.stack(tokens, dim=1),
            logits=torch.stack(logits, dim=1),
            confidence_logits=torch.stack(confidences, dim=1) if confidences else None,
        )
