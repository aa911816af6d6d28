"""`spectool data vocab`: a decode-time draft vocabulary (`spectool.draft_vocab`) for an existing draft, picked
from data the way EAGLE-3's trainer picks its own: the most frequent supervised (assistant) tokens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from spectool.chat_format import ChatFormat
from spectool.checkpoint import load_draft
from spectool.conversations import load_conversations
from spectool.draft_vocab import write_draft_vocab
from spectool.errors import SpectoolError, UsageError
from spectool.hub import load_tokenizer, model_directory, resolve_model
from spectool.registry import get
from spectool.runtime import target_ref_of
from spectool.training.batches import tokenize_conversations
from spectool.training.objectives.eagle3 import build_draft_vocab, count_supervised_tokens


@dataclass
class VocabSummary:
    """What `build_vocab_file` wrote: how many ids of the target's vocabulary it kept, the share of the data's
    supervised tokens they cover, and from how much data."""

    path: str
    size: int
    vocab_size: int
    coverage: float
    supervised_tokens: int
    examples: int
    data: str


def build_vocab_file(
    draft_dir: str | Path,
    *,
    size: int,
    data: str | None = None,
    target: str | None = None,
    max_length: int = 2048,
    skip_bad_rows: bool = False,
) -> VocabSummary:
    """Count the supervised tokens of `data` (default: the data the draft records it was trained on), rendered
    with the chat template of the draft's target (or `target`), and write the `size` most frequent as the draft's
    draft_vocab.safetensors."""
    loaded = load_draft(draft_dir, dtype=None)
    method = get(loaded.method)
    if not method.takes_draft_vocab:
        raise UsageError(
            f"{loaded.path}: {method.title} drafts do not read a full-vocabulary head, so a draft vocabulary does not "
            "apply (EAGLE-3 keeps its own: train it with --draft-vocab-size)"
        )
    recorded = (loaded.metadata.training or {}).get("data") if loaded.metadata else None
    data = data or recorded
    if not data:
        raise UsageError(f"{loaded.path} records no training data; give --data FILE (conversations to count)")
    info = resolve_model(target_ref_of(loaded, target))
    vocab_size = info.arch.vocab_size
    if not 1 <= size < vocab_size:
        raise UsageError(f"--size must be in [1, {vocab_size - 1}] (the target has {vocab_size} tokens), got {size}")
    tokenizer = load_tokenizer(info, model_directory(info))
    conversations, _ = load_conversations(data, require="assistant", skip_bad_rows=skip_bad_rows)
    examples, _ = tokenize_conversations(
        conversations, ChatFormat(tokenizer), max_length=max_length, skip_bad_rows=skip_bad_rows
    )
    if not examples:
        raise SpectoolError(f"{data}: no example keeps a supervised (assistant) token within {max_length} tokens")
    counts = count_supervised_tokens(examples, vocab_size)
    ids = build_draft_vocab(counts, size)
    path = write_draft_vocab(loaded.path, ids)
    total = int(counts.sum())
    coverage = int(counts[ids].sum()) / total if total else 0.0
    return VocabSummary(str(path), size, vocab_size, coverage, total, len(examples), str(data))
