"""What online training and stored features share: the training rows (`prepare_examples`, the data rendered with
the chat template and tokenized) and the target's features of a batch of them (`capture_batch`), so that a run on
stored features and a run that captures them as it goes see the same rows and the same features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spectool.chat_format import ChatFormat, TokenizedExample
from spectool.checkpoint import chat_template_sha256
from spectool.conversations import LoadReport, load_conversations
from spectool.errors import SpectoolError, UsageError
from spectool.target import FrozenTarget, TargetBatch
from spectool.training.batches import Batch, ShuffledBatches, TokenizeReport, tokenize_conversations


def capture_batch(target: FrozenTarget, batch: Batch, *, return_logits: bool = False) -> TargetBatch:
    """Run the frozen target over a `Batch` and return its features.

    A batch of packed rows (several documents per row) runs with a per-document causal mask and per-document
    positions, so every document's features equal those it gets alone.
    """
    packed = bool((batch.document_ids > 0).any())
    if not packed:
        return target.capture(batch.input_ids, batch.attention_mask, batch.loss_mask, return_logits=return_logits)
    store: dict[int | str, torch.Tensor] = {}
    with torch.no_grad(), target.capture_hooks(store):
        target.decoder(
            input_ids=batch.input_ids,
            attention_mask=batch.document_attention_mask(),
            position_ids=batch.position_ids,
            use_cache=False,
        )
    last = store["final_norm"]
    logits = None
    if return_logits:
        if target.lm_head is None:
            raise SpectoolError("this target has no lm_head; logits are unavailable")
        with torch.no_grad():
            logits = target.lm_head(last)
    return TargetBatch(
        input_ids=batch.input_ids,
        loss_mask=batch.loss_mask,
        target_hidden_states=target.features_from(store),
        target_last_hidden_states=last,
        attention_mask=batch.attention_mask,
        target_logits=logits,
    )


def examples_fingerprint(examples: Sequence[TokenizedExample]) -> str:
    """The same hash `ShuffledBatches` uses to recognise its data."""
    return ShuffledBatches(examples, 1, 0).fingerprint()


@dataclass
class PreparedExamples:
    """Tokenized training rows and what loading and tokenizing them reported."""

    examples: list[TokenizedExample]
    load_report: LoadReport
    tokenize_report: TokenizeReport
    chat_template_sha256: str | None


def prepare_examples(config: Any, tokenizer: Any) -> PreparedExamples:
    """Load ``config.data``, render it with the chat template (``config.chat_template`` is a file path overriding
    the tokenizer's) and tokenize it into training rows per ``config.max_length``, ``pack`` and
    ``assistant_turns``; a bad row is an error naming its file and line unless ``config.skip_bad_rows``.

    ``config`` is a `TrainConfig` or a `FeaturesConfig`: online training and stored features read the data
    through this one function, so both see the same rows."""
    data, chat_template, skip_bad_rows = config.data, config.chat_template, config.skip_bad_rows
    max_length, pack, assistant_turns = config.max_length, config.pack, config.assistant_turns
    template_text = None
    if chat_template is not None:
        path = Path(chat_template).expanduser()
        if not path.is_file():
            raise UsageError(f"no such chat template file: {chat_template}")
        template_text = path.read_text(encoding="utf-8")
    conversations, load_report = load_conversations(data, require="assistant", skip_bad_rows=skip_bad_rows)
    chat_format = ChatFormat(tokenizer, chat_template=template_text)
    examples, tokenize_report = tokenize_conversations(
        conversations,
        chat_format,
        max_length=max_length,
        assistant_turns=assistant_turns,
        pack=pack,
        skip_bad_rows=skip_bad_rows,
    )
    if not examples:
        raise SpectoolError(
            f"{data}: no example keeps a supervised (assistant) token within --max-length {max_length} "
            f"({tokenize_report.dropped_unsupervised} dropped, {tokenize_report.rows_skipped} skipped)"
        )
    sha = chat_template_sha256(template_text if template_text is not None else tokenizer.chat_template)
    return PreparedExamples(examples, load_report, tokenize_report, sha)
