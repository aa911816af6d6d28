"""A draft made for a target: `new_draft` builds one with random weights and the target tensors its format stores,
`target_metadata` is what a saved draft records about its target (spectool.json). `spectool init` and the trainer
both start a draft here."""

from __future__ import annotations

from pathlib import Path

import torch

from spectool.checkpoint import DraftMetadata, chat_template_sha256
from spectool.drafts import build_draft
from spectool.errors import UsageError
from spectool.hub import TargetInfo, read_target_weights, transformers_config
from spectool.registry import DraftSpec, get, methods


def target_metadata(info: TargetInfo, spec: DraftSpec) -> DraftMetadata:
    """What a draft records about its target: a local target by absolute path (the embedded one by its name); a
    GGUF target by its file (a packaged one by its file name alone, which finds it wherever the package is
    installed), not by the cache."""
    ref = str(info.directory.resolve()) if info.source == "local" and info.directory else info.ref
    if info.embedded:
        ref = info.ref
    if info.gguf is not None:
        ref = Path(info.gguf.file).name if info.gguf.package else info.gguf.file
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
    method = get(spec.method)
    method.check_spec(spec, info.ref)
    # the target tensors first: a target whose weights cannot be had is refused before an 8B-sized draft is built
    weights = _target_weights(info, spec.method) if method.stores_target_tensors else None
    torch.manual_seed(seed)
    draft = build_draft(
        spec.method,
        transformers_config(info),
        target_layer_ids=list(spec.target_layer_ids),
        num_draft_layers=spec.num_draft_layers,
        dtype=torch.float32,
        **spec.options,
    )
    if weights is not None:
        with torch.no_grad():
            method.copy_target_tensors(draft, weights, spec)
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
            f"(or use {' or '.join(f'--method {m.name}' for m in methods() if not m.stores_target_tensors)}, which needs none)"
        ) from None
