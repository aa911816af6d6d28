"""Answers decoded one at a time, in arrival order, on a worker thread: what `spectool serve` puts behind its API.

The engine holds one KV cache and one proposer state, so one answer runs at a time. Requests wait in a FIFO
queue (fair: first come, first answered); each answer streams its text to the waiting request as the rounds
commit it. A request whose client went away is skipped if it has not started, and stopped after its current
round if it has. The text is held back where the next tokens could still change it: an unfinished UTF-8
character, and the last characters that could be the start of a stop string (OpenAI's answers end before the
stop string, so it must never be sent).
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from spectool.decoding.accept import SamplingParams
from spectool.decoding.engine import GenerationStats, RoundEvent
from spectool.decoding.stops import StopStrings


class TextStream:
    """The text of a growing answer, released in pieces that later tokens cannot change."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stops = tuple(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = ""

    def add(self, tokens: Sequence[int]) -> str:
        """The new text that `tokens` complete (may be empty)."""
        self.ids += tokens
        text = self.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""  # a character split over tokens: wait for the rest
        starts = [text.find(s) for s in self.stops if s in text]  # a stop string completed: never send it
        return self._release(text[: min(starts) if starts else len(text) - self.hold])

    def finish(self, stopped: bool) -> str:
        """The rest of the text once the answer ended; cut before the stop string when one ended it."""
        text = self.decode(self.ids)
        if stopped:
            cuts = [text.find(s) for s in self.stops if s in text]
            text = text[: min(cuts)] if cuts else text
        return self._release(text)

    @property
    def text(self) -> str:
        return self.sent

    def _release(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece


@dataclass
class Finished:
    """How an answer ended: OpenAI's finish reason, its statistics, and its token count."""

    finish_reason: str  # "stop" (eos or a stop string) or "length"
    stats: GenerationStats
    prompt_tokens: int

    def usage(self) -> dict[str, Any]:
        completion = self.stats.new_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}  # fmt: skip

    def extension(self) -> dict[str, Any]:
        """The `spectool` field of a response: what the draft did for this answer (README "Serving")."""
        accepted, drafted = self.stats.accepted_per_position()
        rounds = self.stats.verify_rounds
        return {
            "acceptance_length": round(self.stats.acceptance_length, 4) if rounds else None,
            "target_forwards": len(self.stats.rounds),  # the prefill included
            "drafted_tokens": sum(drafted),
            "accepted_tokens": sum(accepted),
            "seconds": round(self.stats.seconds, 4),
            "tokens_per_second": round(self.stats.tokens_per_second, 2),
        }


@dataclass
class Failed:
    """The answer could not be produced (a bug or a resource error): the request gets a 500."""

    message: str


@dataclass
class Job:
    """One request's answer: what to decode, and where its pieces go (an asyncio queue on the server's loop)."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    seed: int
    stops: tuple[str, ...] = ()
    loop: asyncio.AbstractEventLoop | None = None
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def put(self, item: str | Finished | Failed) -> None:
        if self.loop is None:
            self.out.put_nowait(item)
        else:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class AnswerWorker:
    """Runs queued jobs one at a time through the runtime's engine (`--verify` as the runtime was built)."""

    def __init__(self, runtime, log: Callable[[str], None] | None = None) -> None:
        self.runtime = runtime
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="spectool-answers", daemon=True)
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.answered = 0
        self.busy = False
        # the server's event loop encodes prompts while this thread decodes answers: one tokenizer call at a time
        # (a fast tokenizer's Rust object may refuse a second borrow)
        self.tokenizer_lock = threading.Lock()

    def decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.runtime.decode(ids)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Finish the queued jobs, then end the thread."""
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    @property
    def waiting(self) -> int:
        return self.jobs.qsize()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                continue  # its client left before its turn
            self.busy = True
            try:
                self._answer(job)
            except Exception as exc:  # the server keeps serving; this request gets a 500
                job.put(Failed(f"{type(exc).__name__}: {exc}"))
            finally:
                self.busy = False

    def _answer(self, job: Job) -> None:
        runtime = self.runtime
        stream = TextStream(self.decode, job.stops)
        stop_strings = StopStrings(self.decode, job.stops) if job.stops else None
        rounds: list[RoundEvent] = []
        left = False
        start = time.perf_counter()
        for event in runtime.engine.generate(
            job.prompt_ids,
            max_new_tokens=job.max_tokens,
            sampling=job.sampling,
            stop_token_ids=runtime.stop_token_ids,
            stop_strings=stop_strings,
            seed=job.seed,
        ):
            rounds.append(event)
            piece = stream.add(event.tokens)
            if piece:
                job.put(piece)
            if job.cancelled.is_set():
                left = True
                break  # the client went away: free the engine for the next request
        stats = GenerationStats(rounds, time.perf_counter() - start)
        ending = rounds[-1].finish_reason if rounds else None
        tail = stream.finish(stopped=ending == "stop")
        if tail:
            job.put(tail)
        finished = Finished("length" if ending == "length" else "stop", stats, len(job.prompt_ids))
        job.put(finished)
        self.answered += 1
        self.log(answer_line(self.answered, finished, cancelled=left))


def answer_line(number: int, finished: Finished, *, cancelled: bool = False) -> str:
    """One log line per answer: its size, speed and what the draft did."""
    stats, extension = finished.stats, finished.extension()
    tau = extension["acceptance_length"]
    how = "client left, stopped" if cancelled else f"finish {finished.finish_reason}"
    return (
        f"answer {number}: {finished.prompt_tokens} prompt + {stats.new_tokens} new tokens in {stats.seconds:.2f}s "
        f"({stats.tokens_per_second:.1f} tok/s), acceptance length {tau if tau is not None else 'n/a'}, "
        f"{extension['accepted_tokens']}/{extension['drafted_tokens']} drafted tokens accepted; {how}"
    )
