"""Fixtures for the objective tests: drafts of every family for the tiny random Qwen3 target, and target batches."""

from __future__ import annotations

import copy

import pytest
import torch

from spectool.drafts import build_draft
from spectool.target import FrozenTarget, TargetBatch
from spectool.training.objectives import make_objective

MASK_TOKEN_ID = 250
DRAFT_OPTIONS = {
    "eagle1": dict(target_layer_ids=None),
    "eagle3": dict(target_layer_ids=[0, 1, 2]),
    "dflash": dict(target_layer_ids=[1, 2], num_draft_layers=1, block_size=4, mask_token_id=MASK_TOKEN_ID),
    "dspark": dict(
        target_layer_ids=[1, 3], num_draft_layers=1, block_size=4, mask_token_id=MASK_TOKEN_ID, markov_rank=8
    ),
}


def make_draft(method: str, target, seed: int = 0, **options):
    """A freshly initialised draft wired to the target the way the trainer wires it."""
    torch.manual_seed(seed)
    draft = build_draft(method, target.config, **{**DRAFT_OPTIONS[method], **options})
    if method == "eagle1":
        draft.copy_target_embeddings(target)
    elif method == "eagle3":
        draft.attach_target_embeddings(target.get_input_embeddings())
    elif method == "dspark":
        draft.copy_target_weights(target)
    return draft


def capture(target, objective, input_ids, attention_mask=None, loss_mask=None) -> TargetBatch:
    frozen = FrozenTarget(target, objective.target_layer_ids)
    return frozen.capture(input_ids, attention_mask, loss_mask, return_logits=objective.needs_target_logits)


def run(objective, batch, target, **kwargs):
    return objective(batch, target_lm_head=target.lm_head, target_embed=target.get_input_embeddings(), **kwargs)


@pytest.fixture(scope="session")
def greedy_data(qwen3_target):
    """Two rows of the target's own greedy continuations (so every draft can learn them): 4 prompt tokens then 20
    generated ones (labels); row 1 is 6 tokens shorter (right padding)."""
    generator = torch.Generator().manual_seed(7)
    prompts = torch.randint(0, 240, (2, 4), generator=generator)
    with torch.no_grad():
        ids = qwen3_target.generate(prompts, max_new_tokens=20, do_sample=False, pad_token_id=0)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, -6:] = 0
    loss_mask = attention_mask.clone()
    loss_mask[:, :4] = 0
    return ids, attention_mask, loss_mask


@pytest.fixture(scope="session")
def sharp_target(qwen3_target):
    """The tiny target with its lm_head scaled 30x: the same greedy tokens, but confident (peaked) distributions
    like a trained model's, so distillation losses have a low floor."""
    sharp = copy.deepcopy(qwen3_target)
    with torch.no_grad():
        sharp.lm_head.weight.mul_(30.0)
    return sharp


@pytest.fixture
def objective_for(qwen3_target):
    def build(method: str, draft_options: dict | None = None, *, target=None, **hparams):
        draft = make_draft(method, target if target is not None else qwen3_target, **(draft_options or {}))
        return make_objective(method, draft, **hparams)

    return build


def packed_batch(target, objective, rows: list[list[torch.Tensor]], length: int, prompt: int = 4):
    """Rows that pack the given documents (1-D token tensors) and pad to ``length``, with features captured per
    document (what a target does with a per-document attention mask). The first ``prompt`` tokens of each document
    are not labels. Returns ``(batch, position_ids, document_ids)``."""
    frozen = FrozenTarget(target, objective.target_layer_ids)
    fields = {"input_ids": [], "loss_mask": [], "attention_mask": [], "position_ids": [], "document_ids": []}
    captured = {"target_hidden_states": [], "target_last_hidden_states": [], "target_logits": []}
    for documents in rows:
        parts = {key: [] for key in captured}
        ids, labels, positions, doc_ids = [], [], [], []
        for index, tokens in enumerate(documents):
            out = frozen.capture(tokens[None], return_logits=objective.needs_target_logits)
            for key in captured:
                value = getattr(out, key)
                if value is not None:
                    parts[key].append(value[0])
            ids.append(tokens)
            labels.append((torch.arange(len(tokens)) >= prompt).long())
            positions.append(torch.arange(len(tokens)))
            doc_ids.append(torch.full((len(tokens),), index))
        used = sum(len(t) for t in documents)
        pad = length - used
        fields["input_ids"].append(torch.cat([*ids, torch.zeros(pad, dtype=torch.long)]))
        fields["loss_mask"].append(torch.cat([*labels, torch.zeros(pad, dtype=torch.long)]))
        fields["attention_mask"].append((torch.arange(length) < used).long())
        fields["position_ids"].append(
            torch.cat([*positions, torch.arange(len(documents[-1]), len(documents[-1]) + pad)])
        )
        fields["document_ids"].append(torch.cat([*doc_ids, torch.full((pad,), -1)]))
        for key, values in parts.items():
            if values:
                captured[key].append(torch.cat([*values, values[0].new_zeros(pad, values[0].shape[-1])]))
    stacked = {key: torch.stack(values) for key, values in {**fields, **captured}.items() if values}
    position_ids, document_ids = stacked.pop("position_ids"), stacked.pop("document_ids")
    stacked.setdefault("target_logits", None)
    return TargetBatch(**stacked), position_ids, document_ids


def three_token_documents(lengths_per_row: list[list[int]], seed: int = 0) -> list[list[torch.Tensor]]:
    """Documents over the tokens {0, 1, 2} only; with a head that favours those three ids, greedy hits are common."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, 3, (n,), generator=generator) for n in lengths] for lengths in lengths_per_row]


def three_token_head(seed: int = 0, bias: float = -30.0) -> torch.nn.Linear:
    """A [256 x 64] head whose logits of ids >= 3 sit far below those of 0, 1, 2."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(64, 256)
    with torch.no_grad():
        head.bias[3:] = bias
    return head.requires_grad_(False)


def document_start(document_ids: torch.Tensor, row: int, position: int) -> int:
    ids = document_ids[row].tolist()
    start = position
    while start > 0 and ids[start - 1] == ids[position]:
        start -= 1
    return start


def block_hidden_alone(draft, batch, document_ids, row: int, anchor: int, embed) -> torch.Tensor:
    """``[B, H]``: the draft run on ONE block with its document's context strictly before the anchor, per-document
    positions, and no mask (every query sees every key): what decoding does."""
    block = draft.config.block_size
    start = document_start(document_ids, row, anchor)
    context = batch.target_hidden_states[row, start:anchor][None]
    tokens = torch.full((1, block), draft.config.mask_token_id)
    tokens[0, 0] = batch.input_ids[row, anchor]
    positions = torch.arange(anchor - start + block)[None]
    return draft.run_backbone(embed(tokens), context, positions)[0]
