"""The products of a draft step over a decode-time draft vocabulary (`spectool.draft_vocab`): only the kept rows
of each full-vocabulary weight, drawn from in the kept ids and mapped back to target ids."""

from __future__ import annotations

import torch
from torch import nn

from spectool.decoding.accept import SamplingParams, probabilities, sample


class DraftVocabHead(nn.Module):
    """Copies of the kept rows of full-vocabulary weights (each a frozen ``nn.Linear`` child named as given, so the
    measured kernels can plan it like any draft layer) and the kept target ids."""

    def __init__(self, ids: torch.Tensor, vocab_size: int, **weights: torch.Tensor) -> None:
        super().__init__()
        first = next(iter(weights.values()))
        self.register_buffer("ids", ids.to(first.device))
        self.vocab_size = int(vocab_size)
        for name, weight in weights.items():
            linear = nn.Linear(weight.shape[1], ids.numel(), bias=False, device=weight.device, dtype=weight.dtype)
            linear.weight.requires_grad_(False)
            linear.weight.copy_(weight.detach()[self.ids.to(weight.device)])
            self.add_module(name, linear)

    def scatter(self, logits: torch.Tensor) -> torch.Tensor:
        """Kept-id `logits` [..., kept] as logits over the whole vocabulary, -inf outside the kept ids."""
        full = logits.new_full((*logits.shape[:-1], self.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.ids, logits)

    def draw(
        self, logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Greedy argmax or a sample over the kept ids for each row of kept-id `logits` [..., kept]: the target
        ids drawn, and for a sample its distribution over the whole vocabulary (zero outside the kept ids), which
        rejection sampling needs."""
        if sampling.greedy:
            return self.ids[logits.argmax(-1)], None
        kept = probabilities(logits, sampling)
        full = kept.new_zeros(*kept.shape[:-1], self.vocab_size)
        full.index_copy_(-1, self.ids, kept)
        return self.ids[sample(kept, generator)], full
