"""A draft made for a target: `new_draft` builds one with random weights and the target tensors its format stores,
`target_metadata` is what a saved draft records about its target (spectool.json). `spectool init` and the trainer
both start a draft here."""

from __future__ import annotations

import torch

from spectool.checkpoint import DraftMetadata, chat_template_sha256
from spectool.drafts import build_draft
from spectool.errors import UsageError
from spectool.hub import TargetInfo, read_target_weights, transformers_config
from spectool.registry import DraftSpec


def target_metadata(info: TargetInfo, spec: DraftSpec) -> DraftMetadata:
    """What a draft records about its target (a local target is recorded by absolute path)."""
    ref = str(info.directory.resolve()) if info.source == "local" and info.directory else info.ref
    template = (info.tokenizer_config or {}).get("chat_template")
    if template is None and info.directory is not None and (info.directory / "chat_template.jinja").is_file():
        template = (info.directory / "chat_template.jinja").read_text(encoding="utf-8")
    return DraftMetadata(
        method=spec.method,
        target=ref,
        target_revision=info.revision,
        target_architectures=list(info.arch.architectures),
        num_target_layers=info.arch.num_hidden_layers,
        target_hidden_size=info.arch.hidden_size,
        target_vocab_size=info.arch.vocab_size,
        tokenizer_length=info.tokenizer_length,
        chat_template_sha256=chat_template_sha256(template),
        target_layer_ids=list(spec.target_layer_ids),
    )


def new_draft(info: TargetInfo, spec: DraftSpec, *, seed: int = 0) -> torch.nn.Module:
    """A draft for `spec` with random weights (seeded) and the target tensors its format stores copied in."""
    if spec.method in ("dflash", "dspark") and spec.mask_token_id is None:
        raise UsageError(
            f"{info.ref}: no spare embedding row is known for the {spec.method} mask token; pass --mask-token-id "
            "(an id of the embedding that the tokenizer never produces)"
        )
    torch.manual_seed(seed)
    draft = build_draft(
        spec.method,
        transformers_config(info),
        target_layer_ids=list(spec.target_layer_ids),
        num_draft_layers=spec.num_draft_layers if spec.method != "eagle3" else None,
        block_size=spec.block_size,
        mask_token_id=spec.mask_token_id,
        draft_vocab_size=spec.draft_vocab_size,
        markov_rank=spec.markov_rank or 256,
        dtype=torch.float32,
    )
    if spec.method != "dflash":  # DFlash stores nothing of the target's
        weights = _target_weights(info, spec.method)
        with torch.no_grad():
            if spec.method == "eagle1":
                draft.embed_tokens.weight.copy_(weights["embed_tokens"])
            elif spec.method == "dspark":
                draft.embed_tokens.weight.copy_(weights["embed_tokens"])
                draft.lm_head.weight.copy_(weights["lm_head"])
            else:  # eagle3: the lm_head rows of the draft vocabulary
                head = weights["lm_head"]
                if spec.draft_vocab_size:
                    head = head[draft.draft_to_target(torch.arange(spec.draft_vocab_size))]
                draft.lm_head.weight.copy_(head)
        draft.freeze_target_copies()
    return draft


def _target_weights(info: TargetInfo, method: str) -> dict[str, torch.Tensor]:
    """The target tensors a draft format stores; missing weight files are a one-line error (exit 2)."""
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return read_target_weights(info)
    except (FileNotFoundError, EntryNotFoundError):
        where = info.directory if info.source == "local" else info.ref
        raise UsageError(
            f"{where}: the target's weights are missing (no model.safetensors or model.safetensors.index.json); "
            f"{method} init copies the target's embedding / lm_head from them, so point MODEL at the complete model "
            "(or use --method dflash, which needs none)"
        ) from None
