"""What a bench answers: `BenchPrompt`s from a JSONL file or a named set (``mt-bench``, ``humaneval``).

A prompt is a conversation to answer plus the follow-up user turns to ask after the model's own answer (MT-Bench's
second turns, as EAGLE's and SpecForge's evaluations ask them), with the category it reports under.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spectool import datasets
from spectool.errors import SpectoolError, UsageError


@dataclass
class BenchPrompt:
    """A conversation to answer, the user turns that follow each answer, and its category ("" when none)."""

    messages: list[dict[str, str]]
    followups: list[str] = field(default_factory=list)
    category: str = ""

    @property
    def turns(self) -> int:
        return 1 + len(self.followups)


@dataclass
class PromptSet:
    """The prompts of one bench and where they came from (a file path, or a named set and which copy)."""

    prompts: list[BenchPrompt]
    source: str
    note: str = ""


def load_prompt_set(ref: str | Path, *, turns: int | None = None) -> PromptSet:
    """A named set (``mt-bench``, ``humaneval``, ``heldout``) or a JSONL file of prompts. ``turns`` keeps at most that many user
    turns per prompt (None: all the set has)."""
    if turns is not None and turns < 1:
        raise UsageError(f"--turns must be at least 1, got {turns}")
    text = str(ref)
    if datasets.is_named(text):
        named = datasets.lookup(text)
        assert named is not None
        if named.kind != "prompts":
            raise UsageError(f"{named.name} is a training set; bench takes {', '.join(datasets.names('prompts'))}")
        found = datasets.resolve(text)
        if named.embedded:  # spectool's own prompt files: chat messages
            prompts = [BenchPrompt(messages) for messages in load_prompts(found.path)]
        else:
            prompts = [_named_prompt(row, found.path) for row in _rows(found.path)]
        prompt_set = PromptSet(prompts, named.name, found.note)
    else:
        prompt_set = PromptSet([BenchPrompt(messages) for messages in load_prompts(ref)], str(ref))
    if turns is not None:
        for prompt in prompt_set.prompts:
            prompt.followups = prompt.followups[: turns - 1]
    return prompt_set


def _named_prompt(row: Any, path: Path) -> BenchPrompt:
    """MT-Bench rows (``turns`` or ``prompt`` lists, with a ``category``) and HumanEval rows (``prompt`` code)."""
    if not isinstance(row, dict):
        raise SpectoolError(f"{path}: expected JSON objects, got {type(row).__name__}")
    turns = row.get("turns", row.get("prompt"))
    if isinstance(turns, str):
        turns = [turns]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        raise SpectoolError(f"{path}: a row has no prompt text ({', '.join(sorted(row))})")
    category = row.get("category") if isinstance(row.get("category"), str) else ""
    return BenchPrompt([{"role": "user", "content": turns[0]}], list(turns[1:]), category)


def _rows(path: Path) -> list[Any]:
    """The rows of a JSONL file (gzipped or not) or a parquet file."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError:
            raise SpectoolError(f"{path}: reading parquet needs pyarrow; `pip install pyarrow`") from None
        return parquet.read_table(path).to_pylist()
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    except (OSError, ValueError) as exc:
        raise SpectoolError(f"{path}: cannot read the prompts ({str(exc).splitlines()[0]})") from None


def load_prompts(path: str | Path) -> list[list[dict[str, str]]]:
    """Conversations to answer from a file of `{"prompt": ...}` or `{"messages": [...]}` rows (or ShareGPT
    `{"conversations": [...]}` ones), read as training data is (`spectool.conversations`).

    Trailing assistant turns are dropped (the benchmark generates the answer).
    """
    from spectool.conversations import load_conversations

    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"{path} is a directory; --prompts takes a JSONL file")
    if not path.is_file():
        raise UsageError(f"no such prompts file: {path}")
    if not path.read_bytes().strip():
        raise UsageError(f"{path} holds no prompts")
    prompts = []
    for conversation in load_conversations(path, require="prompt", bad_row_hint=None)[0]:
        messages = conversation.to_dicts()
        while messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        prompts.append(messages)
    return prompts
