"""Regeneration: rewrite the assistant turns of training data with the target itself (`spectool data regen`).

A draft learns the target's own distribution rather than whoever wrote the data. `regenerate` appends
``{"messages": [...], "id": ...}`` JSONL rows to its output, one flush per batch, and resumes after a kill:
`check_regen_output` / `read_finished_ids` find the rows already written (dropping a line a kill cut off), and a
settings record beside the output (`regen_record`) refuses to mix rows made with other settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

from spectool.chat_format import ChatFormat, ChatTemplateError, Message
from spectool.conversations import Conversation
from spectool.decoding.batch import BatchEngine
from spectool.decoding.fast_target import fast_path_problem
from spectool.errors import SpectoolError, UsageError
from spectool.sampling import SamplingParams
from spectool.target import FrozenTarget
from spectool.training.batches import pad_token_id

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class RegenConfig:
    """How to regenerate: greedy at temperature 0, else plain temperature sampling (no top-k / top-p), seeded."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    batch_size: int = 8
    seed: int = 0
    system: str | None = None  # system prompt for rows that have none
    max_turns: int | None = None  # answer at most this many user turns per row (the row ends after the last)
    max_prompt_tokens: int | None = None  # skip a row when a prompt it must answer is longer than this

    def validate(self) -> None:
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise UsageError(f"--max-prompt-tokens must be at least 1, got {self.max_prompt_tokens}")
        if self.max_turns is not None and self.max_turns < 1:
            raise UsageError(f"--max-turns must be at least 1, got {self.max_turns}")
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
        "max_turns": config.max_turns,
        "max_prompt_tokens": config.max_prompt_tokens,
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
    handle, done, dropped = _open_output(out)
    _check_regen_settings(out, _regen_settings(model, chat_format, config), resuming=bool(done))
    pending = _length_sorted(
        [conversation for conversation in conversations if conversation.id not in done], config.batch_size * 16
    )
    already = len(conversations) - len(pending)
    answerer = _Answerer(model, chat_format, config)
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    tally = _RegenTally()
    if progress is not None:
        progress(RegenProgress(len(conversations), already, 0, 0.0))
    with handle:
        for first in range(0, len(pending), config.batch_size):
            batch = pending[first : first + config.batch_size]
            results = _regenerate_batch(answerer, batch)
            _append_rows(handle, batch, results, tally)
            if progress is not None:
                elapsed = time.perf_counter() - started
                progress(RegenProgress(len(conversations), already + tally.written, tally.new_tokens, elapsed))
    return RegenSummary(
        out=str(out),
        rows_total=len(conversations),
        rows_already_done=already,
        rows_written=tally.written,
        assistant_turns=tally.turns,
        new_tokens=tally.new_tokens,
        turns_cut_at_max_new_tokens=tally.cut,
        seconds=time.perf_counter() - started,
        dropped_partial_line=dropped,
        rows_too_long=tally.too_long,
        max_positions=answerer.positions,
    )


def _length_sorted(pending: list[Conversation], window: int) -> list[Conversation]:
    """Rows sorted by length within consecutive windows: a batch pads to its longest prompt, so batching rows of
    like length saves most of the padding, while the data's own order holds between windows (a run stopped early
    has regenerated a sample of the whole set, not its shortest rows)."""

    def size(conversation: Conversation) -> int:
        return sum(len(message.content) for message in conversation.messages)

    return [
        row for first in range(0, len(pending), window) for row in sorted(pending[first : first + window], key=size)
    ]


def _open_output(out: Path) -> tuple[IO[str], set[str], bool]:
    """Open ``out`` for appending (its directory made, a cut-off last line dropped): the handle, the ids already
    written, and whether a cut-off line was dropped."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        done, dropped = read_finished_ids(out)
        handle = open(out, "a", encoding="utf-8")  # closed by the caller's `with handle`
    except OSError as exc:
        raise SpectoolError(f"cannot write {out}: {exc.strerror or exc}") from None
    return handle, done, dropped


@dataclass
class _RegenTally:
    """Running totals of a regeneration run (the rows of this run only, not those found in the output)."""

    written: int = 0
    new_tokens: int = 0
    turns: int = 0
    cut: int = 0
    too_long: int = 0


def _append_rows(
    handle: IO[str], batch: Sequence[Conversation], results: Sequence[_RegenRow], tally: _RegenTally
) -> None:
    """Append a batch's regenerated rows to the output in one write and flush, and count them in ``tally``."""
    lines = []
    for conversation, result in zip(batch, results, strict=True):
        if result.too_long:  # not written: a rerun meets it again and skips it again
            tally.too_long += 1
            continue
        row: dict[str, Any] = {"messages": [m.to_dict() for m in result.messages], "id": conversation.id}
        if result.cut:
            row["truncated"] = True
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        tally.new_tokens += result.new_tokens
        tally.turns += result.turns
        tally.cut += result.cut
    handle.write("".join(lines))  # a kill mid-write leaves at most one cut-off line, repaired on resume
    handle.flush()
    tally.written += len(batch) - sum(result.too_long for result in results)


@dataclass
class _RegenRow:
    messages: list[Message]
    turns: int = 0
    new_tokens: int = 0
    cut: int = 0  # answers that hit max_new_tokens (or the target's last position)
    too_long: bool = False  # a prompt left no position for an answer: the row is skipped


def _regeneration_steps(messages: Sequence[Message], max_turns: int | None = None) -> list[tuple[list[Message], bool]]:
    """Split a conversation into (turns to append, then generate an answer?) steps; assistant turns are
    dropped, each replaced by a generated one, and a trailing user turn gets an answer too. With ``max_turns`` the
    conversation ends after that many answers."""
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
    if max_turns is not None:
        answers = [index for index, (_, answer) in enumerate(steps) if answer]
        if len(answers) > max_turns:
            steps = steps[: answers[max_turns - 1] + 1]
    return steps


def _regenerate_batch(answerer: _Answerer, batch: Sequence[Conversation]) -> list[_RegenRow]:
    chat_format, config, positions = answerer.chat_format, answerer.config, answerer.positions
    rows, plans = [], []
    for conversation in batch:
        messages = list(conversation.messages)
        if config.system is not None and not any(message.role == "system" for message in messages):
            messages.insert(0, Message("system", config.system))
        rows.append(_RegenRow([]))
        plans.append(_regeneration_steps(messages, config.max_turns))
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
        if positions is not None or config.max_prompt_tokens is not None:
            for row, prompt in zip(asking, prompts, strict=True):
                row.too_long = _too_long(len(prompt), positions, config.max_prompt_tokens)
            prompts = [prompt for row, prompt in zip(asking, prompts, strict=True) if not row.too_long]
            asking = [row for row in asking if not row.too_long]
            if not asking:
                continue
        for row, (text, count, finished) in zip(asking, answerer.answers(prompts), strict=True):
            row.messages.append(Message("assistant", text))
            row.turns += 1
            row.new_tokens += count
            row.cut += 0 if finished else 1
    return rows


def _too_long(prompt_tokens: int, positions: int | None, max_prompt_tokens: int | None) -> bool:
    """A prompt that fills the target's positions, or is longer than ``--max-prompt-tokens``, is not answered."""
    return (positions is not None and prompt_tokens >= positions) or (
        max_prompt_tokens is not None and prompt_tokens > max_prompt_tokens
    )


class _Answerer:
    """The target answering a batch of prompts, built once per run: targets spectool's lean forward covers (Llama,
    Mistral, Qwen2, Qwen3) through its batched target loop (`BatchEngine` without a draft: each row at its own
    length, nothing padded after the prompt), the others through HF generate with left padding."""

    def __init__(self, model: PreTrainedModel, chat_format: ChatFormat, config: RegenConfig) -> None:
        self.model, self.chat_format, self.config = model, chat_format, config
        self.positions = getattr(model.config, "max_position_embeddings", None)
        self.stop_ids = sorted(set(chat_format.stop_token_ids) | set(_generation_eos_ids(model)))
        self.pad_id = pad_token_id(chat_format.tokenizer)
        target = FrozenTarget(model, [])
        self.engine = BatchEngine(target) if fast_path_problem(target) is None else None

    def answers(self, prompts: list[list[int]]) -> list[tuple[str, int, bool]]:
        """(answer text, tokens generated incl. the stop token, stopped before max_new_tokens) per prompt; the text
        excludes the stop token. The longest prompt plus its answer never exceed the target's positions."""
        longest = max(len(prompt) for prompt in prompts)
        limit = self.config.max_new_tokens
        max_new_tokens = limit if self.positions is None else min(limit, self.positions - longest)
        generated = self._lean(prompts, max_new_tokens) if self.engine else self._hf(prompts, max_new_tokens)
        answers = []
        for ids in generated:
            ids, finished = cut_at_stop(ids, self.stop_ids)
            text = self.chat_format.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            answers.append((text, len(ids) + (1 if finished else 0), finished))
        return answers

    def _lean(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """A sampled batch's seed is drawn from the stream `regenerate` seeded: a run is reproducible and its
        batches draw independently."""
        seed = int(torch.randint(0, 2**62, (1,)))
        rows = self.engine.generate(
            prompts,
            max_new_tokens=max_new_tokens,
            sampling=SamplingParams(temperature=self.config.temperature),
            stop_token_ids=self.stop_ids,
            seed=seed,
        )
        return [row.tokens for row in rows]

    def _hf(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        model, longest = self.model, max(len(prompt) for prompt in prompts)
        input_ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, longest - len(prompt) :] = 1
        options: dict[str, Any] = {"do_sample": False}
        if self.config.temperature > 0:
            options = {"do_sample": True, "temperature": self.config.temperature, "top_k": 0, "top_p": 1.0}
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids.to(model.device),
                attention_mask=attention_mask.to(model.device),
                max_new_tokens=max_new_tokens,
                eos_token_id=self.stop_ids or None,
                pad_token_id=self.pad_id,
                **options,
            )
        return output[:, longest:].tolist()


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
