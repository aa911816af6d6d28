"""`spectool serve`: an OpenAI-compatible HTTP API on spectool's speculative engine (FastAPI on uvicorn).

Endpoints: `POST /v1/chat/completions` and `POST /v1/completions` (streamed as server-sent events with
`"stream": true`), `GET /v1/models`, `GET /health`. Sampling follows OpenAI's definitions (temperature defaults
to 1; 0 is greedy, exactly the target's own output); `stop` ends the text before the stop string; `seed` makes a
sampled answer repeatable. Answers are decoded one at a time in arrival order (`answers.AnswerWorker`). Errors
are OpenAI-shaped: `{"error": {"message", "type", "param", "code"}}` with a 4xx status for the client's mistakes.
Every response carries a `spectool` field: the answer's acceptance length, target forwards, drafted and accepted
tokens, seconds and tokens/s.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from spectool.answers import AnswerWorker, Failed, Finished, Job
from spectool.decoding.accept import SamplingParams
from spectool.sampling import SamplingError

#: OpenAI's limit on stop sequences.
MAX_STOPS = 4
#: Seconds between checks that a waiting (non-streamed) request's client is still there.
DISCONNECT_POLL = 0.5


class ApiError(Exception):
    """A request the server refuses, answered as OpenAI does."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        if self.status >= 500:
            kind = "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class RequireKey:
    """ASGI middleware: every /v1 request must carry 'Authorization: Bearer KEY' (/health stays open for probes)."""

    def __init__(self, app, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = "invalid or missing API key: send the header 'Authorization: Bearer KEY'"
                await ApiError(401, message, code="invalid_api_key").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class TextPart(BaseModel):
    """A text part of a message's content (the only kind a language model without images reads)."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of a chat request (`developer` is read as `system`, as OpenAI's newer models name it)."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    """`include_usage`: a last chunk with no choices carries the usage, as OpenAI sends it."""

    include_usage: bool = False


class Sampled(BaseModel):
    """What both completion endpoints share. Unknown fields are ignored, as most OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatRequest(Sampled):
    """POST /v1/chat/completions (`max_completion_tokens`, OpenAI's newer name, wins over `max_tokens`)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class CompletionRequest(Sampled):
    """POST /v1/completions: one prompt, continued as it is (no chat template)."""

    prompt: str | list[str]
    echo: bool = False


class Server:
    """The served runtime, its model name and its worker; builds the app."""

    def __init__(self, runtime, *, model_name: str, api_key: str | None = None, worker: AnswerWorker | None = None):
        self.runtime = runtime
        self.model_name = model_name
        self.api_key = api_key
        self.worker = worker or AnswerWorker(runtime)
        self.created = int(time.time())

    def app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            self.worker.start()
            yield
            await asyncio.to_thread(self.worker.stop)

        app = FastAPI(title="spectool", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
        self._errors(app)

        if self.api_key is not None:
            app.add_middleware(RequireKey, key=self.api_key)
        app.get("/health")(self.health)
        app.get("/v1/models")(self.models)
        app.post("/v1/chat/completions")(self.chat_completions)
        app.post("/v1/completions")(self.completions)
        return app

    def _errors(self, app: FastAPI) -> None:
        @app.exception_handler(ApiError)
        async def api_error(_: Request, exc: ApiError) -> JSONResponse:
            return exc.response()

        @app.exception_handler(RequestValidationError)
        async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
            message, param = validation_message(exc.errors())
            return ApiError(400, message, param=param).response()

        @app.exception_handler(HTTPException)
        async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
            return ApiError(exc.status_code, str(exc.detail)).response()

        @app.exception_handler(Exception)
        async def failed(_: Request, exc: Exception) -> JSONResponse:  # a bug: still OpenAI-shaped, one line
            return ApiError(500, f"internal error: {type(exc).__name__}: {exc}").response()

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "answering": self.worker.busy, "waiting": self.worker.waiting}

    async def models(self) -> dict[str, Any]:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "spectool"}
        return {"object": "list", "data": [card]}

    async def chat_completions(self, body: ChatRequest, request: Request):
        self._check_model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        if self.runtime.chat is None:
            raise ApiError(400, "the target's tokenizer has no chat template: use /v1/completions")
        with self.worker.tokenizer_lock:
            ids = self.runtime.prompt_ids(messages)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        job = self._job(body, ids, limit, default_tokens=None)
        return await self._respond(job, body, request, chat=True)

    async def completions(self, body: CompletionRequest, request: Request):
        self._check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "give one prompt per request (a list of several is not served)", param="prompt")
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if not prompts[0]:
            raise ApiError(400, "the prompt is empty", param="prompt")
        with self.worker.tokenizer_lock:
            ids = list(self.runtime.tokenizer(prompts[0])["input_ids"])
        job = self._job(body, ids, body.max_tokens, default_tokens=16)  # OpenAI's default for completions
        return await self._respond(job, body, request, chat=False)

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ApiError(
                404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model", code="model_not_found",
            )  # fmt: skip

    def _job(self, body: Sampled, ids: list[int], max_tokens: int | None, default_tokens: int | None) -> Job:
        """The job of a request, its limits checked: an answer must fit the target's positions."""
        if body.n != 1:
            raise ApiError(400, "only n=1 is served", param="n")
        limit = self.runtime.info.arch.max_position_embeddings
        room = limit - len(ids) if isinstance(limit, int) and limit > 0 else None
        if room is not None and room < 1:
            message = (
                f"the prompt is {len(ids)} tokens; the model's context is {limit} tokens, with none left to answer"
            )
            raise ApiError(400, message, param="messages", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = default_tokens if default_tokens is not None else room
            max_tokens = min(max_tokens, room) if room is not None else max_tokens
        if max_tokens is None or max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        if room is not None and max_tokens > room:
            message = (
                f"max_tokens is {max_tokens} but the prompt is {len(ids)} tokens and the model's context is "
                f"{limit}: at most {room} tokens fit"
            )
            raise ApiError(400, message, param="max_tokens", code="context_length_exceeded")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ApiError(400, f"stop takes up to {MAX_STOPS} non-empty strings", param="stop")
        temperature = 1.0 if body.temperature is None else body.temperature
        try:
            sampling = SamplingParams(temperature=temperature, top_p=1.0 if body.top_p is None else body.top_p)
        except SamplingError as exc:
            raise ApiError(400, str(exc).replace("--", ""), param="temperature") from None
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        return Job(ids, max_tokens, sampling, seed, tuple(stops), loop=asyncio.get_running_loop())

    async def _respond(self, job: Job, body: Sampled, request: Request, *, chat: bool):
        self.worker.submit(job)
        answer = Answer(self.model_name, chat)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._events(job, answer, usage), media_type="text/event-stream")
        text = []
        async for item in pieces(job, request):
            if isinstance(item, str):
                text.append(item)
            else:
                return answer.whole("".join(text), item)
        return JSONResponse({}, status_code=499)  # the client left: nobody reads this

    async def _events(self, job: Job, answer: Answer, usage: bool) -> AsyncIterator[str]:
        try:
            yield sse(answer.chunk({"role": "assistant", "content": ""} if answer.chat else ""))
            async for item in pieces(job, None):
                if isinstance(item, str):
                    yield sse(answer.chunk({"content": item} if answer.chat else item))
                    continue
                yield sse(answer.chunk({} if answer.chat else "", item))
                if usage:
                    yield sse({**answer.head(), "choices": [], "usage": item.usage()})
        except ApiError as exc:  # the headers are sent: the error goes in the stream, as OpenAI's does
            yield sse(json.loads(exc.response().body))
        finally:  # the stream ended or its client left (the task is cancelled): stop the answer either way
            job.cancelled.set()
        yield "data: [DONE]\n\n"


class Answer:
    """The OpenAI response shapes of one answer (chat or text completion)."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model, self.chat = model, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def head(self, chunk: bool = True) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def chunk(self, delta: dict[str, str] | str, finished: Finished | None = None) -> dict[str, Any]:
        reason = finished.finish_reason if finished else None
        choice = {"index": 0, "delta": delta} if self.chat else {"index": 0, "text": delta}
        out = {**self.head(), "choices": [{**choice, "logprobs": None, "finish_reason": reason}]}
        if finished is not None:
            out["spectool"] = finished.extension()
        return out

    def whole(self, text: str, finished: Finished) -> dict[str, Any]:
        content = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        choice = {"index": 0, **content, "logprobs": None, "finish_reason": finished.finish_reason}
        return {
            **self.head(chunk=False),
            "choices": [choice],
            "usage": finished.usage(),
            "spectool": finished.extension(),
        }


async def pieces(job: Job, request: Request | None) -> AsyncIterator[str | Finished]:
    """The job's text pieces, then its `Finished`; raises a 500 `ApiError` if it failed. With `request`, stops
    (and cancels the job) when the client disconnects while waiting."""
    try:
        while True:
            try:
                item = await asyncio.wait_for(job.out.get(), timeout=DISCONNECT_POLL)
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    return
                continue
            if isinstance(item, Failed):
                raise ApiError(500, f"the answer failed: {item.message}")
            yield item
            if isinstance(item, Finished):
                return
    finally:
        if request is not None:
            job.cancelled.set()  # no effect once the answer finished


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def validation_message(errors: Any) -> tuple[str, str | None]:
    """One line for a request that does not parse (malformed JSON, a missing or mistyped field): (message, param)."""
    first = list(errors)[0] if errors else {}
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if not where:
        return "the request body must be a JSON object (send it with 'Content-Type: application/json')", None
    field_name = ".".join(where) or None
    message = first.get("msg", "invalid request")
    return (f"{field_name}: {message}" if field_name else message), field_name
