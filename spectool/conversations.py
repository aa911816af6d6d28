"""Conversation readers, the one home of reading conversations and prompts: training and regeneration data, and
benchmark prompt files (`spectool.bench_prompts`), from files, directories or Hub datasets.

`load_conversations` reads OpenAI ``messages`` rows, ShareGPT ``conversations`` rows or plain ``prompt`` rows from
JSONL, JSON, parquet, a directory of such files, or a Hub dataset (`resolve_data_files` finds the files), into
`Conversation` values with stable ids. A malformed row is an error naming its file and line, or is counted and
skipped in the `LoadReport`. `read_utf8` reads a whole text file with one-line errors.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from spectool import datasets
from spectool.chat_format import Message, Role
from spectool.errors import SpectoolError, UsageError, json_problem

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
    notes: list[str] = field(default_factory=list)  # which copy of a named data set was read
    leading_assistant_dropped: int = 0  # ShareGPT rows whose opening assistant turns were dropped

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
    bad_row_hint: str | None = "skip such rows with --skip-bad-rows",
) -> tuple[list[Conversation], LoadReport]:
    """Read conversations from a file, a directory of data files, or a Hub dataset id.

    ``require="assistant"`` (training) needs an assistant turn in every row; ``require="prompt"``
    (regeneration) needs a user turn before any assistant turn and accepts plain ``{"prompt": ...}`` rows.
    A malformed row raises a `SpectoolError` naming file and line, unless ``skip_bad_rows`` counts it instead.
    A named set (``sharegpt``: `spectool.datasets`) skips its malformed rows (ShareGPT has empty and odd-role ones)
    and says which copy it read in the report's notes.
    """
    report = LoadReport()
    if datasets.is_named(str(source)):
        named = datasets.resolve(str(source))
        source, skip_bad_rows = named.path, True
        if named.note:
            report.notes.append(named.note)
    files = resolve_data_files(source, revision=revision)
    report.files = [str(path) for path in files]
    conversations: list[Conversation] = []
    for path in files:
        for raw in _read_rows(path):
            report.rows_read += 1
            try:
                if raw.error is not None:
                    raise _RowError(raw.error)
                messages = _parse_messages(raw.value)
                if _sharegpt_form(raw.value):  # FastChat's and EAGLE's ShareGPT readers drop an opening gpt turn
                    messages, dropped = _drop_opening_assistant(messages)
                    report.leading_assistant_dropped += dropped
                _check_requirement(messages, require)
            except _RowError as exc:
                reason = f"{raw.label}: {exc}"
                if not skip_bad_rows:
                    raise SpectoolError(f"{reason} ({bad_row_hint})" if bad_row_hint else reason) from None
                report.skip(reason)
                continue
            row_id = raw.value.get("id")
            explicit = str(row_id) if isinstance(row_id, (str, int)) and not isinstance(row_id, bool) else ""
            conversations.append(Conversation(messages, source=str(path), line=raw.line, id=explicit))
    report.rows_loaded = len(conversations)
    if report.leading_assistant_dropped:
        report.notes.append(
            f"{report.leading_assistant_dropped} ShareGPT rows open with an assistant turn before any user turn: "
            "it was dropped, as FastChat's and EAGLE's ShareGPT readers do"
        )
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


def _sharegpt_form(row: Any) -> bool:
    """Whether a row is in ShareGPT's own form (``conversations`` of ``from`` / ``value`` turns)."""
    turns = row.get("conversations") if isinstance(row, dict) and "messages" not in row else None
    return isinstance(turns, list) and bool(turns) and isinstance(turns[0], dict) and "from" in turns[0]


def _drop_opening_assistant(messages: list[Message]) -> tuple[list[Message], bool]:
    """The turns without the assistant turns that come before the first user turn (system turns stay), and
    whether there were any."""
    first_user = next((i for i, message in enumerate(messages) if message.role == "user"), len(messages))
    opening = messages[:first_user]
    if not any(message.role == "assistant" for message in opening):
        return messages, False
    return [message for message in opening if message.role != "assistant"] + messages[first_user:], True


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
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from spectool.hub import offline_reason

    offline = offline_reason()
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
                    yield _RawRow(label, number, error=f"not valid JSON ({json_problem(exc)})")
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
        if text.lstrip().startswith("[") and _ends_inside_value(text, exc):
            yield from _read_cut_array(path, text)
            return
        raise SpectoolError(f"{path}:{exc.lineno}: not valid JSON ({json_problem(exc)})") from None
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


def _ends_inside_value(text: str, exc: json.JSONDecodeError) -> bool:
    """Whether a parse failed because the text stops mid-value (a cut download or copy), not on a bad character:
    the error sits at the end, or a string runs to the end (a string cannot span a raw newline, so an unterminated
    one means the text ended)."""
    return exc.msg.startswith("Unterminated string") or exc.pos >= len(text.rstrip())


def _read_cut_array(path: Path, text: str) -> Iterator[_RawRow]:
    """The complete rows of a JSON list whose text was cut off, then the cut row as a row error."""
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    number = 0
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        number += 1
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            if not _ends_inside_value(text, exc):
                raise SpectoolError(f"{path}:{exc.lineno}: not valid JSON ({json_problem(exc)})") from None
            yield _RawRow(f"{path}, row {number}", number, error="the file ends inside this row (it was cut off)")
            return
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
