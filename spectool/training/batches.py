"""Training examples into batches: truncation, packing, padding, shuffled resumable batches, the held-out split.

`tokenize_conversations` turns conversations into `TokenizedExample` rows (through `ChatFormat.tokenize`),
truncated and optionally packed (`pack_examples`); `collate` pads them into a `Batch`; `ShuffledBatches` serves
seeded, shuffled, length-grouped batches whose position can be saved and restored; `split_heldout` sets aside the
held-out examples.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from spectool.chat_format import AssistantTurns, ChatFormat, ChatTemplateError, TokenizedExample
from spectool.conversations import MAX_REASONS, Conversation
from spectool.errors import SpectoolError, UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class TokenizeReport:
    """How many conversations became examples, how many were truncated or dropped, and why rows failed."""

    conversations: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_unsupervised: int = 0  # nothing supervised left (e.g. the answer fell past max_length)
    rows_skipped: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    reasons: list[str] = field(default_factory=list)


def tokenize_conversations(
    conversations: Sequence[Conversation],
    chat_format: ChatFormat,
    *,
    max_length: int,
    assistant_turns: AssistantTurns = "all",
    pack: bool = False,
    skip_bad_rows: bool = False,
) -> tuple[list[TokenizedExample], TokenizeReport]:
    """Tokenize, truncate to ``max_length`` and optionally pack conversations into training rows.

    An example with no supervised token after truncation is dropped (it would teach nothing). A conversation
    the template cannot render is an error naming its row, or is counted with ``skip_bad_rows``.
    """
    if max_length < 2:
        raise UsageError(f"--max-length must be at least 2, got {max_length}")
    report = TokenizeReport(conversations=len(conversations))
    examples = []
    for conversation in conversations:
        try:
            example = chat_format.tokenize(conversation.messages, assistant_turns)
        except ChatTemplateError as exc:
            if not skip_bad_rows:
                raise ChatTemplateError(f"{conversation.where}: {exc}") from None
            report.rows_skipped += 1
            if len(report.reasons) < MAX_REASONS:
                report.reasons.append(f"{conversation.where}: {exc}")
            continue
        if len(example) > max_length:
            example = example.truncated(max_length)
            report.truncated += 1
        if example.num_supervised == 0:
            report.dropped_unsupervised += 1
            continue
        examples.append(example)
    if pack:
        examples = pack_examples(examples, max_length)
    report.examples = len(examples)
    report.tokens = sum(len(example) for example in examples)
    report.supervised_tokens = sum(example.num_supervised for example in examples)
    return examples, report


def pack_examples(examples: Sequence[TokenizedExample], max_length: int) -> list[TokenizedExample]:
    """Concatenate consecutive examples into rows of at most ``max_length`` tokens (next fit, order kept).

    Position ids restart at 0 and document ids count up for every document in a row, so attention and rotary
    positions can stay within a document (see `Batch.document_attention_mask`).
    """
    rows: list[TokenizedExample] = []
    current: TokenizedExample | None = None
    for example in examples:
        example = example.truncated(max_length)
        if current is not None and len(current) + len(example) <= max_length:
            document = current.document_ids[-1] + 1
            current.input_ids.extend(example.input_ids)
            current.loss_mask.extend(example.loss_mask)
            current.position_ids.extend(range(len(example)))
            current.document_ids.extend([document] * len(example))
            continue
        current = TokenizedExample(
            list(example.input_ids), list(example.loss_mask), list(range(len(example))), [0] * len(example)
        )
        rows.append(current)
    return rows


@dataclass
class Batch:
    """A right-padded training batch; every tensor is ``[B, S]`` int64.

    ``attention_mask`` is 1 on real tokens, ``loss_mask`` 1 on supervised assistant tokens, ``position_ids``
    restart at 0 for each packed document (and keep counting over the padding), ``document_ids`` number the
    documents of a row from 0 and are -1 on padding.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    document_ids: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.loss_mask.to(device),
            self.position_ids.to(device),
            self.document_ids.to(device),
        )

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def document_attention_mask(self) -> torch.Tensor:
        """Bool ``[B, 1, S, S]``: query i may attend key j when both are in the same document and j <= i.

        Padding queries attend to themselves only, so no attention row is fully masked (which gives NaN).
        """
        length = self.input_ids.shape[1]
        same = self.document_ids[:, :, None] == self.document_ids[:, None, :]
        real = (self.document_ids >= 0)[:, :, None]
        causal = torch.ones(length, length, dtype=torch.bool, device=self.input_ids.device).tril()
        diagonal = torch.eye(length, dtype=torch.bool, device=self.input_ids.device)
        return ((same & real & causal) | diagonal).unsqueeze(1)


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, else its eos id, else 0 (padding is masked, so any id is safe)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int) and candidate >= 0:
            return candidate
    return 0


def collate(examples: Sequence[TokenizedExample], pad_token_id: int, *, pad_to: int | None = None) -> Batch:
    """Right-pad examples to the longest one (or to ``pad_to``) and stack them into a `Batch`."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    longest = max(len(example) for example in examples)
    length = max(longest, pad_to or 0)
    size = (len(examples), length)
    input_ids = torch.full(size, pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(size, dtype=torch.long)
    loss_mask = torch.zeros(size, dtype=torch.long)
    position_ids = torch.zeros(size, dtype=torch.long)
    document_ids = torch.full(size, -1, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        loss_mask[row, :n] = torch.tensor(example.loss_mask, dtype=torch.long)
        last = example.position_ids[-1] + 1 if n else 0
        position_ids[row] = torch.tensor(example.position_ids + list(range(last, last + length - n)), dtype=torch.long)
        document_ids[row, :n] = torch.tensor(example.document_ids, dtype=torch.long)
    return Batch(input_ids, attention_mask, loss_mask, position_ids, document_ids)


#: How many batches' worth of shuffled examples `length_grouped` sorts by length together.
GROUP_BATCHES = 50


def length_grouped(order: list[int], lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """Reorder a shuffled ``order`` so that each batch holds examples of similar length (less padding to compute).

    The order is cut into runs of ``GROUP_BATCHES * batch_size`` examples, each run is sorted by length and cut
    into batches, and the full batches are shuffled over the epoch (with ``generator``), the full batch holding
    the longest example first, so a batch that does not fit in memory fails at the first step rather than hours
    in. A final partial batch stays last. Every example still appears exactly once.
    """
    if batch_size < 2 or len(order) <= batch_size:
        return order
    run = GROUP_BATCHES * batch_size
    grouped: list[int] = []
    for start in range(0, len(order), run):
        grouped.extend(sorted(order[start : start + run], key=lambda i: -lengths[i]))
    batches = [grouped[i : i + batch_size] for i in range(0, len(grouped), batch_size)]
    tail = [batches.pop()] if len(batches[-1]) < batch_size else []
    shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    longest = max(range(len(shuffled)), key=lambda b: max(lengths[i] for i in shuffled[b]))
    shuffled[0], shuffled[longest] = shuffled[longest], shuffled[0]
    return [i for batch in shuffled + tail for i in batch]


class ShuffledBatches:
    """Seeded, shuffled batches over examples, epoch after epoch, with a position that survives a restart.

    Epoch e visits the examples in the order of a permutation seeded by (seed, e), regrouped so that a batch holds
    examples of similar length (`length_grouped`), so the sequence of batches is a pure function of the data, the
    seed and the batch size. With ``batches_per_step`` > 1 (gradient accumulation) the grouping keeps the examples
    of one optimizer step together, so its micro-batches hold the same examples as one batch that size would.
    `state_dict` records the epoch and the offset into that permutation; `load_state_dict` restores it, and the
    batches that follow are the ones an uninterrupted run would have produced. ``num_epochs=None`` iterates
    forever (the trainer counts steps).
    """

    def __init__(
        self,
        examples: Sequence[TokenizedExample],
        batch_size: int,
        pad_token_id: int,
        *,
        seed: int = 0,
        drop_last: bool = False,
        pad_to: int | None = None,
        num_epochs: int | None = None,
        batches_per_step: int = 1,
    ) -> None:
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {batch_size}")
        if not examples:
            raise SpectoolError("no training examples to batch")
        if drop_last and len(examples) < batch_size:
            raise SpectoolError(f"{len(examples)} examples cannot fill one batch of {batch_size} (drop_last is set)")
        self.examples = examples
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.seed = seed
        self.drop_last = drop_last
        self.pad_to = pad_to
        self.batches_per_step = max(1, batches_per_step)
        self.num_epochs = num_epochs
        self.epoch = 0
        self.position = 0  # offset into this epoch's permutation of the next example to serve
        self._order: list[int] | None = None
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(len(self.examples), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        remaining = len(self.examples) - self.position
        if remaining == 0 or (self.drop_last and remaining < self.batch_size):
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        order = self._epoch_order()
        chosen = order[self.position : self.position + self.batch_size]
        self.position += len(chosen)
        return collate([self.examples[i] for i in chosen], self.pad_token_id, pad_to=self.pad_to)

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(len(self.examples), generator=generator).tolist()
            lengths = [len(example) for example in self.examples]
            self._order = length_grouped(order, lengths, self.batch_size * self.batches_per_step, generator)
        return self._order

    def fingerprint(self) -> str:
        """A hash of the examples' tokens: restoring a position only makes sense on the same data."""
        if self._fingerprint is None:
            digest = hashlib.sha1()
            for example in self.examples:
                digest.update(array("q", [len(example)]).tobytes())
                digest.update(array("q", example.input_ids).tobytes())
                digest.update(array("b", example.loss_mask).tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "num_examples": len(self.examples),
            "fingerprint": self.fingerprint(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue where ``state`` left off; refuses when the data or the seed changed."""
        if state.get("num_examples") != len(self.examples) or state.get("fingerprint") != self.fingerprint():
            raise SpectoolError(
                f"the saved data position belongs to other data ({state.get('num_examples')} examples, "
                f"fingerprint {state.get('fingerprint')}; now {len(self.examples)}, {self.fingerprint()}): "
                "resume with the same data and options, or start afresh"
            )
        if state.get("seed") != self.seed:
            raise SpectoolError(f"the saved data position used seed {state.get('seed')}, not {self.seed}")
        position = int(state["position"])
        if not 0 <= position <= len(self.examples):
            raise SpectoolError(f"the saved data position {position} is out of range")
        self.epoch, self.position, self._order = int(state["epoch"]), position, None


T = TypeVar("T")


def split_heldout(items: Sequence[T], heldout_fraction: float, *, seed: int = 0) -> tuple[list[T], list[T]]:
    """Split into (train, held_out) with ``round(n * fraction)`` held-out items (at least 1 when the fraction is
    positive and n > 1) chosen by a seeded permutation; both parts keep the input order."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise UsageError(f"the held-out fraction must be in [0, 1), got {heldout_fraction}")
    count = round(len(items) * heldout_fraction)
    if heldout_fraction > 0 and count == 0 and len(items) > 1:
        count = 1
    generator = torch.Generator().manual_seed(seed)
    held = set(torch.randperm(len(items), generator=generator)[:count].tolist())
    train = [item for i, item in enumerate(items) if i not in held]
    heldout = [item for i, item in enumerate(items) if i in held]
    return train, heldout
