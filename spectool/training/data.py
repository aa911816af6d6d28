"""Training data for drafts: conversations in, token ids with assistant loss masks out; regeneration.

The journey of a row:

1. `load_conversations` reads OpenAI ``messages`` rows, ShareGPT ``conversations`` rows or plain ``prompt``
   rows from JSONL, JSON, parquet, a directory of such files, or a Hub dataset, into `Conversation` values.
   A malformed row is an error naming its file and line, or is counted and skipped.
2. `ChatFormat` renders a conversation with the target's chat template and marks the assistant tokens: a draft
   learns what the target generates, so exactly the assistant turns (with their end-of-turn token, which the
   draft must predict too) are supervised, and template-inserted empty ``<think></think>`` blocks are not.
3. `tokenize_conversations` truncates (and optionally packs) the examples; `collate` pads them into a
   `Batch`; `ShuffledBatches` serves seeded, shuffled, length-grouped batches whose position can be saved and restored.
4. `regenerate` rewrites the assistant turns with the target itself, so the draft learns the target's own
   distribution rather than whoever wrote the data; it appends JSONL and resumes after a kill.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch

from spectool.errors import SpectoolError, UsageError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Role = Literal["system", "user", "assistant"]
AssistantTurns = Literal["all", "last"]
Requirement = Literal["assistant", "prompt"]

#: Role names accepted in rows: OpenAI names, and the ShareGPT ``from`` names.
ROLE_NAMES: dict[str, Role] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
}
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")
#: JSON files that Hub datasets carry beside their rows.
_METADATA_FILES = frozenset({"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"})
_HUB_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: How many skip reasons a report keeps.
MAX_REASONS = 5
#: An empty thinking block that Qwen3-style templates insert at the start of an assistant turn.
_EMPTY_THINK = re.compile(r"<think>\s*</think>\s*")
_TRAILING_EMPTY_THINK = re.compile(r"<think>\s*</think>\s*$")


# --------------------------------------------------------------------------------------------------------------
# Conversations and loading
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One turn of a conversation, with the role normalised to system / user / assistant."""

    role: Role
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass
class Conversation:
    """A conversation and where it came from.

    ``line`` is the 1-based line of a JSONL file, or the 1-based row number in a JSON or parquet file. ``id`` is
    stable across runs: the row's own ``id`` field when it has one, else a hash of its turns (a repeated id gets
    a ``#2``, ``#3``... suffix), so regeneration can tell which rows it has already written.
    """

    messages: list[Message]
    source: str
    line: int
    id: str = ""

    @property
    def where(self) -> str:
        """``data.jsonl:17`` for a JSONL line, ``data.json, row 17`` for a JSON or parquet row."""
        if self.source.lower().endswith((".json", ".parquet")):
            return f"{self.source}, row {self.line}"
        return f"{self.source}:{self.line}"

    def to_dicts(self) -> list[dict[str, str]]:
        return [message.to_dict() for message in self.messages]


@dataclass
class LoadReport:
    """What loading read and what it skipped (with the first few reasons, each naming file and line)."""

    files: list[str] = field(default_factory=list)
    rows_read: int = 0
    rows_loaded: int = 0
    rows_skipped: int = 0
    reasons: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.rows_skipped += 1
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(reason)


class _RowError(Exception):
    """A malformed row; the loader adds the file and line."""


@dataclass
class _RawRow:
    label: str  # "data.jsonl:17" or "data.json, row 17": how errors name the row
    line: int
    value: Any = None
    error: str | None = None  # the row could not even be parsed


def load_conversations(
    source: str | os.PathLike[str],
    *,
    require: Requirement = "assistant",
    skip_bad_rows: bool = False,
    revision: str | None = None,
) -> tuple[list[Conversation], LoadReport]:
    """Read conversations from a file, a directory of data files, or a Hub dataset id.

    ``require="assistant"`` (training) needs an assistant turn in every row; ``require="prompt"``
    (regeneration) needs a user turn before any assistant turn and accepts plain ``{"prompt": ...}`` rows.
    A malformed row raises a `SpectoolError` naming file and line, unless ``skip_bad_rows`` counts it instead.
    """
    files = resolve_data_files(source, revision=revision)
    report = LoadReport(files=[str(path) for path in files])
    conversations: list[Conversation] = []
    for path in files:
        for raw in _read_rows(path):
            report.rows_read += 1
            try:
                if raw.error is not None:
                    raise _RowError(raw.error)
                messages = _parse_messages(raw.value)
                _check_requirement(messages, require)
            except _RowError as exc:
                reason = f"{raw.label}: {exc}"
                if not skip_bad_rows:
                    raise SpectoolError(f"{reason} (skip such rows with --skip-bad-rows)") from None
                report.skip(reason)
                continue
            row_id = raw.value.get("id")
            explicit = str(row_id) if isinstance(row_id, (str, int)) and not isinstance(row_id, bool) else ""
            conversations.append(Conversation(messages, source=str(path), line=raw.line, id=explicit))
    report.rows_loaded = len(conversations)
    if not conversations:
        detail = f"; first problem: {report.reasons[0]}" if report.reasons else ""
        raise SpectoolError(
            f"{source}: no usable rows ({report.rows_read} read, {report.rows_skipped} skipped){detail}"
        )
    _assign_ids(conversations)
    return conversations, report


def _parse_messages(row: Any) -> list[Message]:
    """The turns of one row: ``messages`` (role/content), ``conversations`` (from/value or role/content) or
    ``prompt`` (a single user turn). Raises `_RowError` with a short reason for anything else."""
    if not isinstance(row, dict):
        raise _RowError(f"expected a JSON object, got {_type_name(row)}")
    if "prompt" in row and "messages" not in row and "conversations" not in row:
        prompt = row["prompt"]
        if not isinstance(prompt, str):
            raise _RowError(f"'prompt' is {_type_name(prompt)}, not a string")
        return [Message("user", prompt)]
    key = "messages" if "messages" in row else "conversations" if "conversations" in row else None
    if key is None:
        raise _RowError("no 'messages', 'conversations' or 'prompt' field")
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        raise _RowError(f"'{key}' must be a non-empty list of turns")
    messages = []
    for index, turn in enumerate(turns):
        where = f"{key}[{index}]"
        if not isinstance(turn, dict):
            raise _RowError(f"{where} is {_type_name(turn)}, not an object")
        role_key, content_key = ("role", "content") if "role" in turn else ("from", "value")
        if role_key not in turn:
            raise _RowError(f"{where} has no 'role' (or ShareGPT 'from')")
        if content_key not in turn:
            raise _RowError(f"{where} has no '{content_key}'")
        raw_role, content = turn[role_key], turn[content_key]
        role = ROLE_NAMES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise _RowError(f"{where} has unknown role {raw_role!r} (expected system, user/human or assistant/gpt)")
        if not isinstance(content, str):
            raise _RowError(f"{where}.{content_key} is {_type_name(content)}, not a string")
        messages.append(Message(role, content))
    return messages


def _check_requirement(messages: list[Message], require: Requirement) -> None:
    roles = [message.role for message in messages]
    if require == "assistant":
        if "assistant" not in roles:
            raise _RowError("no assistant turn (training supervises assistant turns)")
        return
    if "user" not in roles:
        raise _RowError("no user turn to answer")
    if "assistant" in roles and roles.index("assistant") < roles.index("user"):
        raise _RowError("an assistant turn comes before the first user turn")


def _assign_ids(conversations: list[Conversation]) -> None:
    seen: dict[str, int] = {}
    for conversation in conversations:
        base = conversation.id or _content_hash(conversation.messages)
        seen[base] = seen.get(base, 0) + 1
        conversation.id = base if seen[base] == 1 else f"{base}#{seen[base]}"


def _content_hash(messages: Sequence[Message]) -> str:
    canonical = json.dumps([[m.role, m.content] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha1(canonical.encode("utf-8")).hexdigest()[:16]


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def resolve_data_files(source: str | os.PathLike[str], *, revision: str | None = None) -> list[Path]:
    """The data files behind SOURCE: a file, the data files under a directory (sorted), or a Hub dataset's
    data files downloaded with huggingface_hub. A missing local path is a usage error (exit 2)."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        files = _data_files_under(path)
        if not files:
            raise UsageError(f"{path} holds no {', '.join(DATA_SUFFIXES)} files")
        return files
    if path.is_file():
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise UsageError(f"{path}: unsupported file type {path.suffix!r} (expected {', '.join(DATA_SUFFIXES)})")
        return [path]
    looks_local = text.startswith((".", "/", "~")) or path.suffix.lower() in DATA_SUFFIXES or "\\" in text
    if looks_local or not _HUB_DATASET_ID.match(text):
        raise UsageError(f"no such file or directory: {text} (give a data file, a directory, or a Hub dataset id)")
    return _data_files_under(_download_dataset(text, revision))


def _data_files_under(directory: Path) -> list[Path]:
    found = []
    for path in sorted(directory.rglob("*")):
        parts = path.relative_to(directory).parts
        if any(part.startswith(".") for part in parts) or not path.is_file():
            continue
        if path.suffix.lower() in DATA_SUFFIXES and path.name not in _METADATA_FILES:
            found.append(path)
    return found


def _download_dataset(repo_id: str, revision: str | None) -> Path:
    """Download a Hub dataset's data files (JSONL / JSON / parquet only); the cache answers when offline."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from spectool.hub import _hub_unreachable

    offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _hub_unreachable(constants.ENDPOINT)
    patterns = [f"*{suffix}" for suffix in DATA_SUFFIXES]
    try:
        folder = snapshot_download(
            repo_id,
            repo_type="dataset",
            revision=revision,
            allow_patterns=patterns,
            local_files_only=offline is not None,
        )
    except GatedRepoError:
        raise SpectoolError(f"dataset {repo_id} is gated: accept its terms on the Hub, then set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise SpectoolError(f"{repo_id} is neither a local path nor a dataset on the Hub") from None
    except RevisionNotFoundError:
        raise SpectoolError(f"dataset {repo_id} has no revision {revision!r}") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise SpectoolError(
            f"{repo_id} is not a local path, and the Hub dataset is not in the local cache "
            f"({offline or 'the Hub could not be reached'}); download it where the Hub is reachable or pass a file"
        ) from None
    except HfHubHTTPError as exc:
        raise SpectoolError(
            f"the Hub answered with an error for dataset {repo_id}: {str(exc).splitlines()[0]}"
        ) from None
    directory = Path(folder)
    if not _data_files_under(directory):
        raise SpectoolError(f"dataset {repo_id} has no {', '.join(DATA_SUFFIXES)} files")
    return directory


def _read_rows(path: Path) -> Iterator[_RawRow]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(path)
    elif suffix == ".json":
        yield from _read_json(path)
    else:
        yield from _read_jsonl(path)


def _read_jsonl(path: Path) -> Iterator[_RawRow]:
    try:
        with open(path, encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                label = f"{path}:{number}"
                try:
                    yield _RawRow(label, number, value=json.loads(line))
                except json.JSONDecodeError as exc:
                    yield _RawRow(label, number, error=f"not valid JSON ({exc.msg} at column {exc.colno})")
    except UnicodeDecodeError as exc:
        raise SpectoolError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise SpectoolError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_utf8(path: Path) -> str:
    """A whole text file (a leading BOM dropped); undecodable or unreadable files are one-line errors."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpectoolError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise SpectoolError(f"cannot read {path}: {exc.strerror or exc}") from None


def _read_json(path: Path) -> Iterator[_RawRow]:
    text = read_utf8(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines saved with a .json name
            yield from _read_jsonl(path)
            return
        raise SpectoolError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict):
        if any(key in data for key in ("messages", "conversations", "prompt")):
            data = [data]
        else:
            lists = [key for key, value in data.items() if isinstance(value, list)]
            if len(lists) != 1:
                found = f"lists under {', '.join(map(repr, lists))}" if lists else "no list"
                raise SpectoolError(f"{path}: expected a list of rows or an object holding one list ({found})")
            data = data[lists[0]]
    if not isinstance(data, list):
        raise SpectoolError(f"{path}: expected a list of rows, got {_type_name(data)}")
    for number, value in enumerate(data, start=1):
        yield _RawRow(f"{path}, row {number}", number, value=value)


def _read_parquet(path: Path) -> Iterator[_RawRow]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise SpectoolError(f"{path}: reading parquet needs pyarrow; install it with `pip install pyarrow`") from None
    try:
        reader = parquet.ParquetFile(path)
        batches = reader.iter_batches(batch_size=1024)
        number = 0
        for batch in batches:
            for value in batch.to_pylist():
                number += 1
                yield _RawRow(f"{path}, row {number}", number, value=value)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid / ArrowIOError derive from these
        raise SpectoolError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None


# --------------------------------------------------------------------------------------------------------------
# Chat template rendering and assistant loss masks
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TokenizedExample:
    """One training row: token ids and a loss mask (1 on supervised assistant tokens), plus per-token position
    ids and document ids that restart for every document packed into the row (0 and 0 when not packed)."""

    input_ids: list[int]
    loss_mask: list[int]
    position_ids: list[int] = field(default_factory=list)
    document_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.loss_mask) != len(self.input_ids):
            raise ValueError(f"loss_mask has {len(self.loss_mask)} entries for {len(self.input_ids)} tokens")
        if not self.position_ids:
            self.position_ids = list(range(len(self.input_ids)))
        if not self.document_ids:
            self.document_ids = [0] * len(self.input_ids)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        return sum(self.loss_mask)

    def truncated(self, max_length: int) -> TokenizedExample:
        """The first ``max_length`` tokens (right truncation keeps the prompt the answer depends on)."""
        return TokenizedExample(
            self.input_ids[:max_length],
            self.loss_mask[:max_length],
            self.position_ids[:max_length],
            self.document_ids[:max_length],
        )


class ChatTemplateError(SpectoolError):
    """The chat template could not render a conversation, or its assistant turns could not be located."""


class ChatFormat:
    """A tokenizer's chat template (or an override) plus what loss masking needs to know about it.

    The supervised span of an assistant turn is found from the template itself, without ``{% generation %}``
    tags: render the conversation before the turn with ``add_generation_prompt=True``; where that prompt ends in
    the full rendering, the assistant's generation starts. It ends with the end-of-turn token (the first special
    token the template puts after an assistant's content, found once by probing), which is supervised because a
    draft must predict it. An empty ``<think></think>`` block at the start of the span is the template's, not the
    model's, and stays unsupervised. Character spans map to tokens through the fast tokenizer's offsets.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        chat_template: str | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise SpectoolError("the tokenizer has no chat template; pass one (--chat-template FILE)")
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.template_kwargs = dict(template_kwargs or {})
        self._special_texts = self._special_token_texts()
        #: The token that closes the final assistant turn (what generation stops at), and every end-of-turn token.
        self.end_of_turn, self.end_of_turn_texts = self._probe_end_of_turn()

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
        """The chat template's text for ``messages`` (special tokens as text; tokenize without adding more)."""
        from jinja2.exceptions import TemplateError

        try:
            text = self.tokenizer.apply_chat_template(
                [message.to_dict() for message in messages],
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                chat_template=self.chat_template,
                **self.template_kwargs,
            )
        except (TemplateError, ValueError, TypeError) as exc:
            first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ChatTemplateError(f"the chat template failed: {first_line}") from None
        if not isinstance(text, str):
            raise ChatTemplateError(f"the chat template rendered {type(text).__name__}, not text")
        return text

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of the prompt a model answers: the conversation plus the assistant generation prompt."""
        return self.encode(self.render(messages, add_generation_prompt=True))

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end an assistant turn: the end-of-turn token and the tokenizer's eos."""
        ids = []
        if self.end_of_turn is not None:
            ids.append(self.tokenizer.convert_tokens_to_ids(self.end_of_turn))
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return sorted({i for i in ids if isinstance(i, int) and i >= 0})

    def _special_token_texts(self) -> list[str]:
        texts = {token.content for token in self.tokenizer.added_tokens_decoder.values() if token.special}
        if self.tokenizer.eos_token:
            texts.add(self.tokenizer.eos_token)
        return sorted(texts, key=len, reverse=True)

    def _probe_end_of_turn(self) -> tuple[str | None, tuple[str, ...]]:
        """The special token the template writes right after an assistant's content (e.g. ``<|im_end|>``), for
        a final turn and for a turn that later turns follow (some templates close the two differently)."""
        question, answer = Message("user", "spectool-probe-question"), Message("assistant", "spectool-probe-answer")
        found: list[str] = []
        for messages in ([question, answer], [question, answer, question]):
            try:
                text = self.render(messages)
            except ChatTemplateError:
                if len(messages) == 2:  # a template that cannot render one exchange is unusable
                    raise
                continue
            at = text.find(answer.content)
            tail = text[at + len(answer.content) :] if at >= 0 else ""
            hits = [(tail.find(special), special) for special in self._special_texts if special in tail]
            if hits and min(hits)[1] not in found:
                found.append(min(hits)[1])
        return (found[0] if found else None), tuple(found)

    def assistant_spans(
        self, messages: Sequence[Message], text: str, assistant_turns: AssistantTurns = "all"
    ) -> list[tuple[int, int]]:
        """Character spans ``[start, end)`` of the supervised assistant text inside ``text`` (the rendering of
        all of ``messages``): each assistant turn, or only the last one."""
        indices = [i for i, message in enumerate(messages) if message.role == "assistant"]
        if assistant_turns == "last":
            indices = indices[-1:]
        return [self._assistant_span(messages, index, text) for index in indices]

    def _assistant_span(self, messages: Sequence[Message], index: int, text: str) -> tuple[int, int]:
        number = sum(1 for message in messages[: index + 1] if message.role == "assistant")
        prompt = self.render(messages[:index], add_generation_prompt=True)
        start = None
        # A template may open the generation with an empty think block that the history rendering drops.
        for candidate in (prompt, _TRAILING_EMPTY_THINK.sub("", prompt)):
            if text.startswith(candidate):
                start = len(candidate)
                break
        if start is None:
            raise ChatTemplateError(
                f"assistant turn {number}: the chat template renders the conversation before it differently from "
                "the prompt it answers; supervise only the last turn (assistant_turns='last')"
            )
        think = _EMPTY_THINK.match(text, start)
        if think:
            start = think.end()
        # When the template renders the turn the same way with and without later turns, the turn is the text
        # between the prompt and the end of that rendering, and it ends with the last special token in it (an
        # end-of-turn string inside the content cannot cut it short; templates that close a turn with a token
        # other than the probed one, like <|end|> vs <|return|>, are handled too).
        alone = self.render(messages[: index + 1])
        if text.startswith(alone) and len(alone) >= start:
            found = [(text.rfind(special, start, len(alone)), special) for special in self._special_texts]
            ends = [position + len(special) for position, special in found if position >= 0]
            return start, max(ends) if ends else start + len(text[start : len(alone)].rstrip())
        # Otherwise (e.g. Qwen3 drops reasoning from earlier turns) the turn ends at the next end-of-turn token.
        found = [(text.find(special, start), special) for special in self.end_of_turn_texts]
        found = [(position, special) for position, special in found if position >= 0]
        if not found:
            raise ChatTemplateError(
                f"assistant turn {number}: cannot find where it ends (no end-of-turn token after it, and the "
                "template renders it differently once later turns follow)"
            )
        position, special = min(found)
        return start, position + len(special)

    def tokenize(self, conversation: Conversation, assistant_turns: AssistantTurns = "all") -> TokenizedExample:
        """Render and tokenize a conversation; the loss mask is 1 exactly on supervised assistant tokens."""
        if not getattr(self.tokenizer, "is_fast", False):
            raise SpectoolError("loss masks need a fast tokenizer (one with a tokenizer.json) for character offsets")
        text = self.render(conversation.messages)
        spans = self.assistant_spans(conversation.messages, text, assistant_turns)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = list(encoding["input_ids"])
        return TokenizedExample(input_ids, _mask_from_spans(encoding["offset_mapping"], spans))


def _mask_from_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for every token whose characters overlap a span."""
    mask = [0] * len(offsets)
    ordered = sorted(spans)
    cursor = 0
    for position, (begin, end) in enumerate(offsets):
        if end <= begin:
            continue
        while cursor < len(ordered) and ordered[cursor][1] <= begin:
            cursor += 1
        if cursor < len(ordered) and ordered[cursor][0] < end:
            mask[position] = 1
    return mask


# --------------------------------------------------------------------------------------------------------------
# Truncation, packing, padding
# --------------------------------------------------------------------------------------------------------------


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
            example = chat_format.tokenize(conversation, assistant_turns)
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


# --------------------------------------------------------------------------------------------------------------
# Shuffled, resumable batches; train / held-out split
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# Regeneration with the target
# --------------------------------------------------------------------------------------------------------------


@dataclass
class RegenConfig:
    """How to regenerate: greedy at temperature 0, else plain temperature sampling (no top-k / top-p), seeded."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    batch_size: int = 8
    seed: int = 0
    system: str | None = None  # system prompt for rows that have none

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise UsageError(f"--temperature must be 0 (greedy) or positive, got {self.temperature}")


def _regen_settings(model: PreTrainedModel, chat_format: ChatFormat, config: RegenConfig) -> dict[str, Any]:
    """What decides a regenerated answer: the target, the chat template and the decoding settings."""
    template = chat_format.chat_template or getattr(chat_format.tokenizer, "chat_template", None) or ""
    return {
        "target": str(getattr(model, "name_or_path", "") or ""),
        "chat_template_sha1": hashlib.sha1(str(template).encode("utf-8")).hexdigest()[:12],
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "seed": config.seed,
        "system": config.system,
    }


def _check_regen_settings(out: Path, settings: dict[str, Any], *, resuming: bool) -> None:
    """Resuming appends to rows made with the same settings only: ``<out>.regen.json`` records them (atomically,
    before the first row); rows from other settings would be skipped as done without a word."""
    record = regen_record(out)
    if resuming and record.is_file():
        try:
            saved = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        if isinstance(saved, dict):
            changed = [key for key in settings if saved.get(key) != settings[key]]
            if changed:
                detail = ", ".join(f"{key} {saved.get(key)!r} (now {settings[key]!r})" for key in changed)
                raise UsageError(
                    f"{out} holds rows regenerated with other settings: {detail}; write to a new --out, or delete "
                    f"{record.name} if only the target's path changed"
                )
    try:
        staging = record.with_name(record.name + ".tmp")
        staging.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        os.replace(staging, record)
    except OSError as exc:
        raise SpectoolError(f"cannot write {record}: {exc.strerror or exc}") from None


@dataclass
class RegenProgress:
    """Reported before the first batch and after every batch (cumulative)."""

    rows_total: int
    rows_done: int
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class RegenSummary:
    """What a regeneration run did."""

    out: str
    rows_total: int  # input rows considered
    rows_already_done: int  # found in the output file at start
    rows_written: int
    assistant_turns: int
    new_tokens: int
    turns_cut_at_max_new_tokens: int
    seconds: float
    dropped_partial_line: bool  # a truncated last line (from a kill) was removed before appending
    rows_too_long: int = 0  # skipped: a prompt filled the target's max_position_embeddings
    max_positions: int | None = None  # the target's max_position_embeddings (prompt + answer never exceed it)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def regen_record(out: Path) -> Path:
    """The settings file `spectool data regen` keeps beside its output (``<out>.regen.json``)."""
    return out.with_name(out.name + ".regen.json")


def check_regen_output(out: Path) -> tuple[set[str], bool]:
    """Ids already written to a regeneration output, and whether its last line was cut off by a kill; reads only.

    Every line must be a regeneration row, else the file is not one spectool wrote and is refused untouched. A
    last line without its newline is the row a kill cut off; it is dropped (by `read_finished_ids`) only when the
    settings record beside the file shows that spectool was writing it.
    """
    if out.is_dir():
        raise UsageError(f"{out} is a directory; the output must be a JSONL file path")
    if not out.exists():
        return set(), False
    try:
        data = out.read_bytes()
    except OSError as exc:
        raise SpectoolError(f"cannot read {out}: {exc.strerror or exc}") from None
    complete = data.rfind(b"\n") + 1
    partial = complete < len(data)
    ids: set[str] = set()
    for number, line in enumerate(data[:complete].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SpectoolError(
                f"{out}:{number}: not a regeneration row (invalid JSON); choose another --out"
            ) from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            raise SpectoolError(f"{out}:{number}: not a regeneration row (no string 'id'); choose another --out")
        ids.add(row["id"])
    if partial and not regen_record(out).is_file():
        raise SpectoolError(
            f"{out} ends with an incomplete line and was not written by `spectool data regen` (no "
            f"{regen_record(out).name} beside it); choose another --out"
        )
    return ids, partial


def read_finished_ids(out: Path) -> tuple[set[str], bool]:
    """`check_regen_output`, then drop the cut-off last line a kill left (its row is regenerated).

    Returns (ids, whether a partial last line was dropped).
    """
    ids, partial = check_regen_output(out)
    if partial:
        with open(out, "rb+") as handle:
            data = handle.read()
            handle.truncate(data.rfind(b"\n") + 1)
    return ids, partial


def regenerate(
    model: PreTrainedModel,
    chat_format: ChatFormat,
    conversations: Sequence[Conversation],
    out: Path,
    config: RegenConfig,
    *,
    progress: Callable[[RegenProgress], None] | None = None,
) -> RegenSummary:
    """Regenerate the assistant turns of ``conversations`` with ``model`` and append them to ``out`` as JSONL
    ``{"messages": [...], "id": ...}`` rows, one flush per batch. Rows whose id is already in ``out`` are skipped.

    Every assistant turn is regenerated, in order, each conditioned on the regenerated earlier answers (the
    original answers are never shown to the target); a row ending with a user turn gets one more answer. A row
    whose answer hit ``max_new_tokens`` gets ``"truncated": true``.
    """
    config.validate()
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        done, dropped = read_finished_ids(out)
        handle = open(out, "a", encoding="utf-8")  # closed by the `with handle` below
    except OSError as exc:
        raise SpectoolError(f"cannot write {out}: {exc.strerror or exc}") from None
    _check_regen_settings(out, _regen_settings(model, chat_format, config), resuming=bool(done))
    pending = [conversation for conversation in conversations if conversation.id not in done]
    already = len(conversations) - len(pending)
    positions = getattr(model.config, "max_position_embeddings", None)
    stop_ids = sorted(set(chat_format.stop_token_ids) | set(_generation_eos_ids(model)))
    pad_id = pad_token_id(chat_format.tokenizer)
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    new_tokens = turns = cut = written = too_long = 0
    if progress is not None:
        progress(RegenProgress(len(conversations), already, 0, 0.0))
    with handle:
        for first in range(0, len(pending), config.batch_size):
            batch = pending[first : first + config.batch_size]
            results = _regenerate_batch(model, chat_format, batch, config, stop_ids, pad_id, positions)
            lines = []
            for conversation, result in zip(batch, results, strict=True):
                if result.too_long:  # not written: a rerun meets it again and skips it again
                    too_long += 1
                    continue
                row: dict[str, Any] = {"messages": [m.to_dict() for m in result.messages], "id": conversation.id}
                if result.cut:
                    row["truncated"] = True
                lines.append(json.dumps(row, ensure_ascii=False) + "\n")
                new_tokens += result.new_tokens
                turns += result.turns
                cut += result.cut
            handle.write("".join(lines))  # a kill mid-write leaves at most one cut-off line, repaired on resume
            handle.flush()
            written += len(batch) - sum(result.too_long for result in results)
            if progress is not None:
                elapsed = time.perf_counter() - started
                progress(RegenProgress(len(conversations), already + written, new_tokens, elapsed))
    return RegenSummary(
        out=str(out),
        rows_total=len(conversations),
        rows_already_done=already,
        rows_written=written,
        assistant_turns=turns,
        new_tokens=new_tokens,
        turns_cut_at_max_new_tokens=cut,
        seconds=time.perf_counter() - started,
        dropped_partial_line=dropped,
        rows_too_long=too_long,
        max_positions=positions,
    )


@dataclass
class _RegenRow:
    messages: list[Message]
    turns: int = 0
    new_tokens: int = 0
    cut: int = 0  # answers that hit max_new_tokens (or the target's last position)
    too_long: bool = False  # a prompt left no position for an answer: the row is skipped


def _regeneration_steps(messages: Sequence[Message]) -> list[tuple[list[Message], bool]]:
    """Split a conversation into (turns to append, then generate an answer?) steps; assistant turns are
    dropped, each replaced by a generated one, and a trailing user turn gets an answer too."""
    steps: list[tuple[list[Message], bool]] = []
    pending: list[Message] = []
    for message in messages:
        if message.role == "assistant":
            steps.append((pending, True))
            pending = []
        else:
            pending.append(message)
    if pending:
        steps.append((pending, any(message.role == "user" for message in pending)))
    return steps


def _regenerate_batch(
    model: PreTrainedModel,
    chat_format: ChatFormat,
    batch: Sequence[Conversation],
    config: RegenConfig,
    stop_ids: list[int],
    pad_id: int,
    positions: int | None = None,
) -> list[_RegenRow]:
    rows, plans = [], []
    for conversation in batch:
        messages = list(conversation.messages)
        if config.system is not None and not any(message.role == "system" for message in messages):
            messages.insert(0, Message("system", config.system))
        rows.append(_RegenRow([]))
        plans.append(_regeneration_steps(messages))
    for step in range(max(len(plan) for plan in plans)):
        asking = []
        for row, plan in zip(rows, plans, strict=True):
            if step < len(plan) and not row.too_long:
                turns, answer = plan[step]
                row.messages.extend(turns)
                if answer:
                    asking.append(row)
        if not asking:
            continue
        try:
            prompts = [chat_format.prompt_ids(row.messages) for row in asking]
        except ChatTemplateError as exc:
            raise ChatTemplateError(f"{batch[0].where} (batch starting there): {exc}") from None
        if positions is not None:
            for row, prompt in zip(asking, prompts, strict=True):
                row.too_long = len(prompt) >= positions
            prompts = [prompt for row, prompt in zip(asking, prompts, strict=True) if not row.too_long]
            asking = [row for row in asking if not row.too_long]
            if not asking:
                continue
        for row, (text, count, finished) in zip(
            asking, _generate(model, chat_format, prompts, config, stop_ids, pad_id, positions), strict=True
        ):
            row.messages.append(Message("assistant", text))
            row.turns += 1
            row.new_tokens += count
            row.cut += 0 if finished else 1
    return rows


def _generate(
    model: PreTrainedModel,
    chat_format: ChatFormat,
    prompts: list[list[int]],
    config: RegenConfig,
    stop_ids: list[int],
    pad_id: int,
    positions: int | None = None,
) -> list[tuple[str, int, bool]]:
    """Batched HF generate with left padding. Returns (answer text, tokens generated incl. the stop token,
    stopped before max_new_tokens) per prompt; the answer text excludes the stop token. With ``positions`` (the
    target's max_position_embeddings) the longest prompt plus its answer never exceed it."""
    longest = max(len(prompt) for prompt in prompts)
    max_new_tokens = config.max_new_tokens if positions is None else min(config.max_new_tokens, positions - longest)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, longest - len(prompt) :] = 1
    options: dict[str, Any] = {"do_sample": False}
    if config.temperature > 0:
        options = {"do_sample": True, "temperature": config.temperature, "top_k": 0, "top_p": 1.0}
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_ids or None,
            pad_token_id=pad_id,
            **options,
        )
    answers = []
    for generated in output[:, longest:].tolist():
        ids, finished = cut_at_stop(generated, stop_ids)
        text = chat_format.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        answers.append((text, len(ids) + (1 if finished else 0), finished))
    return answers


def cut_at_stop(generated: Sequence[int], stop_ids: Sequence[int]) -> tuple[list[int], bool]:
    """The generated ids before the first stop id, and whether a stop id was found (else the length limit hit)."""
    stops = set(stop_ids)
    for position, token in enumerate(generated):
        if token in stops:
            return list(generated[:position]), True
    return list(generated), False


def _generation_eos_ids(model: PreTrainedModel) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else [int(i) for i in eos]
