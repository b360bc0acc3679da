"""The OpenAI-compatible HTTP API: `cake-cli --model M [--topology T] --api HOST:PORT`.

Routes: `POST /v1/chat/completions`, `POST /v1/completions` (both with `stream: true` as
server-sent events in OpenAI's chunk format), `GET /v1/models`, `GET /v1/models/{id}` and
`GET /health`. Errors always have OpenAI's shape: `{"error": {message, type, param, code}}`.

Each request is its own session (`Master.generate` opens one on the master and on every worker),
so requests only share compute, and the stages pipeline their steps. A request's generation runs
as its own task and is stopped *between* two steps: a client that goes away never interrupts a
forward that a worker is still computing, and `Master.generate`'s `finally` closes the session
everywhere. At most `max_concurrent` generations run at once; more get HTTP 429 (no queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from cake.chat import StreamDecoder, encode_chat
from cake.errors import ContextError, WorkerError
from cake.master import GenerationStats, Master
from cake.remote import RemoteStage
from cake.sampling import SamplingParams
from cake.speculative import DraftSettings, request_draft
from cake.topology import parse_address

log = logging.getLogger(__name__)

OPENAI_DEFAULT_TEMPERATURE = 1.0  # what OpenAI uses when a request names none
MAX_STOP_STRINGS = 16
GRACEFUL_SHUTDOWN_S = 5.0  # then uvicorn cancels the streams still open


# ---------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered as HTTP `status` with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"message": message, "type": type, "param": param, "code": code}


def _error_response(error: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error.body}, status_code=error.status, headers=headers)


def _generation_error(exc: BaseException, param: str) -> ApiError:
    """What a failed generation answers, before the response starts or as a stream's last event."""
    if isinstance(exc, ContextError):
        return ApiError(400, str(exc), param=param, code="context_length_exceeded")
    if isinstance(exc, WorkerError):
        return ApiError(502, str(exc), type="server_error", code="worker_unavailable")
    log.error("generation failed", exc_info=exc)
    return ApiError(500, f"internal error: {exc!r}", type="server_error", code="internal_error")


# ---------------------------------------------------------------- requests


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # "developer" is what newer OpenAI clients send in place of "system".
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_message(self) -> dict[str, str]:
        content = (
            self.content
            if isinstance(self.content, str)
            else "".join(part.text for part in self.content)
        )
        role = "system" if self.role == "developer" else self.role
        message = {"role": role, "content": content}
        return {**message, "name": self.name} if self.name else message


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Fields common to both endpoints; unknown fields are ignored, as OpenAI clients send many."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # not OpenAI's; vLLM and llama.cpp accept it too
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    # cake's extension: speculative decoding for this request (default: the server's --draft):
    # "lookup", "model" (the server's --draft PATH), or "none"; and tokens per round, N or "auto".
    cake_draft: Literal["lookup", "model", "none"] | None = None
    cake_draft_tokens: int | Literal["auto"] | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(
                400, f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", param="stop"
            )
        return [s for s in stops if s]

    def check_supported(self) -> None:
        if self.n != 1:
            raise ApiError(
                400,
                f"n={self.n} is not supported: cake generates one choice per request "
                "(send several requests, they run concurrently)",
                param="n",
            )
        if self.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer name of max_tokens
    tools: list[Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise ApiError(400, "tools (function calling) are not supported", param="tools")


class CompletionRequest(_GenerationRequest):
    # A text, a one-element list of texts, or the token ids themselves.
    prompt: str | list[str] | list[int]
    echo: bool = False
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if (
            isinstance(self.prompt, list)
            and len(self.prompt) > 1
            and isinstance(self.prompt[0], str)
        ):
            raise ApiError(
                400,
                f"got {len(self.prompt)} prompts: cake completes one prompt per request",
                param="prompt",
            )
        if self.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if self.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported", param="best_of")


@dataclass(frozen=True)
class ApiDefaults:
    """What a request gets for what it does not say: the server's CLI options."""

    max_tokens: int = 256
    top_k: int | None = None
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    ignore_eos: bool = False

    @classmethod
    def from_options(cls, opts: dict) -> ApiDefaults:
        return cls(
            max_tokens=opts.get("sample_len") or cls.max_tokens,
            top_k=opts.get("top_k"),
            repeat_penalty=opts.get("repeat_penalty") or cls.repeat_penalty,
            repeat_last_n=opts.get("repeat_last_n", cls.repeat_last_n),
            seed=opts.get("seed"),
            ignore_eos=bool(opts.get("ignore_eos")),
        )

    def sampling(self, request: _GenerationRequest) -> SamplingParams:
        temperature = request.temperature
        try:
            return SamplingParams(
                temperature=OPENAI_DEFAULT_TEMPERATURE if temperature is None else temperature,
                top_k=request.top_k if request.top_k is not None else self.top_k,
                top_p=request.top_p,
                repeat_penalty=self.repeat_penalty,
                repeat_last_n=self.repeat_last_n,
                seed=request.seed if request.seed is not None else self.seed,
            )
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None


# ---------------------------------------------------------------- generation


class StopFilter:
    """Cuts streamed text before the first stop string.

    Text that could still be the start of a stop string is held back until the next piece
    decides, so a stop string is never sent, not even split across two chunks.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = False

    def push(self, piece: str) -> str:
        """The text that is now safe to send."""
        if self.hit:
            return ""
        self.pending += piece
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit = True
            text, self.pending = self.pending[: min(found)], ""
            return text
        keep = self._partial_stop_len()
        text = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return text

    def flush(self) -> str:
        """At the end of the generation: what was held back was no stop string after all."""
        text, self.pending = self.pending, ""
        return "" if self.hit else text

    def _partial_stop_len(self) -> int:
        """Length of the longest end of `pending` that a stop string begins with."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(stop[:k]):
                    longest = k
                    break
        return longest


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int  # tokens generated, up to a stop string's cut

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


Event = str | Finished | BaseException  # a text piece; the end; or what went wrong


class Generation:
    """One request's generation, as a task that hands text pieces to the response.

    `stop()` takes effect after the step in flight: stopping inside a forward would leave a
    worker computing for a session that the next message closes.
    """

    def __init__(
        self,
        master: Master,
        prompt_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        stops: Sequence[str],
        ignore_eos: bool,
        draft: DraftSettings | None = None,
    ) -> None:
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._stopped = False
        stats = GenerationStats()
        tokens = master.generate(prompt_ids, params, max_tokens, ignore_eos, stats, draft)
        self.task = asyncio.create_task(
            self._run(tokens, stats, master.tokenizer, stops, len(prompt_ids))
        )

    def stop(self) -> None:
        self._stopped = True

    async def _run(
        self,
        tokens: AsyncIterator[int],
        stats: GenerationStats,
        tokenizer: Any,
        stops: Sequence[str],
        prompt_tokens: int,
    ) -> None:
        decoder = StreamDecoder(tokenizer)
        stop_filter = StopFilter(stops)
        count = 0
        try:
            async for token in tokens:
                count += 1
                text = stop_filter.push(decoder.push(token))
                if text:
                    self.events.put_nowait(text)
                if stop_filter.hit or self._stopped:
                    break
            else:
                text = stop_filter.push(decoder.finish())
                text += stop_filter.flush()
                if text:
                    self.events.put_nowait(text)
            reason = "stop" if stop_filter.hit else stats.finish_reason
            self.events.put_nowait(Finished(reason, prompt_tokens, count))
        except Exception as exc:
            self.events.put_nowait(exc)
        finally:
            await tokens.aclose()  # closes the session on the master and every worker


# ---------------------------------------------------------------- the service


class Service:
    """The model behind the routes: its id, the defaults, and the generations running now."""

    def __init__(
        self, master: Master, model_name: str, max_concurrent: int, defaults: ApiDefaults
    ) -> None:
        self.master = master
        self.model_name = model_name
        self.max_concurrent = max_concurrent
        self.defaults = defaults
        self.created = int(time.time())
        self.running: set[Generation] = set()

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "cake",
        }

    async def start(
        self, request: _GenerationRequest, prompt_ids: list[int], max_tokens: int | None, param: str
    ) -> tuple[Generation, Event]:
        """Start a generation and wait for its first event, so that a prompt too long or a
        worker that is gone is answered with an HTTP status, not inside a started stream."""
        if len(self.running) >= self.max_concurrent:
            raise ApiError(
                429,
                f"{len(self.running)} requests are generating, the most this server runs at "
                "once (--max-concurrent); retry later",
                type="rate_limit_error",
                code="too_many_requests",
            )
        try:
            draft = request_draft(
                self.master.draft,
                request.cake_draft,
                request.cake_draft_tokens,
                self.master.draft_model is not None,
            )
        except ValueError as exc:
            raise ApiError(400, str(exc), param="cake_draft") from None
        generation = Generation(
            self.master,
            prompt_ids,
            self.defaults.sampling(request),
            max_tokens or self.defaults.max_tokens,
            request.stop_strings(),
            self.defaults.ignore_eos,
            draft,
        )
        self.running.add(generation)
        generation.task.add_done_callback(lambda _: self.running.discard(generation))
        try:
            first = await generation.events.get()
        except BaseException:
            generation.stop()
            raise
        if isinstance(first, BaseException):
            raise _generation_error(first, param)
        return generation, first

    async def close(self) -> None:
        """Cancel what still runs (the server is going down), so sessions close before the
        master does."""
        tasks = [generation.task for generation in self.running]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def health(self) -> tuple[bool, dict[str, Any]]:
        """Every stage and whether it is reachable now. A worker whose connection is gone gets
        one reconnection attempt here: generations only reconnect when they need the worker,
        and a health check that never did would report a restarted worker as down forever."""
        stages = []
        for stage in self.master.stages:
            blocks = f"{stage.blocks.start}-{stage.blocks.stop - 1}"
            if not isinstance(stage, RemoteStage):
                stages.append({"stage": stage.label, "blocks": blocks, "connected": True})
                continue
            client = stage.client
            if client.link is None:
                with contextlib.suppress(WorkerError):
                    await client.ensure_connected(deadline=time.monotonic())
            stages.append(
                {
                    "stage": stage.label,
                    "blocks": blocks,
                    "worker": client.node.name,
                    "address": client.node.address,
                    "connected": client.link is not None,
                }
            )
        ok = all(stage["connected"] for stage in stages)
        return ok, {
            "status": "ok" if ok else "unavailable",
            "model": self.model_name,
            "running": len(self.running),
            "max_concurrent": self.max_concurrent,
            "stages": stages,
        }


# ---------------------------------------------------------------- responses


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events for one generation, which stops as soon as the response ends, however
    it ends. When the client goes away, Starlette cancels the send; without this, the events'
    generator would wait for the garbage collector (or, if it never started, run to the end)."""

    media_type = "text/event-stream"

    def __init__(self, generation: Generation, events: AsyncGenerator[str, None]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.stop()
            await self.events.aclose()


async def _collect(generation: Generation, first: Event, param: str) -> tuple[str, Finished]:
    pieces: list[str] = []
    event = first
    while True:
        if isinstance(event, BaseException):
            raise _generation_error(event, param)
        if isinstance(event, Finished):
            return "".join(pieces), event
        pieces.append(event)
        event = await generation.events.get()


async def _stream(
    generation: Generation,
    first: Event,
    chunk: Callable[[str | None, str | None], dict[str, Any]],
    opening: dict[str, Any] | None,
    usage_chunk: dict[str, Any] | None,
    param: str,
) -> AsyncGenerator[str, None]:
    """SSE lines: `opening` (if any), one chunk per text piece, a last chunk with the
    finish_reason, the usage chunk (if asked), `[DONE]`. A failure ends the stream with an
    error event and no `[DONE]`, so that no client mistakes it for a normal finish."""
    if opening is not None:
        yield _sse(opening)
    event = first
    while not isinstance(event, Finished):
        if isinstance(event, BaseException):
            yield _sse({"error": _generation_error(event, param).body})
            return
        yield _sse(chunk(event, None))
        event = await generation.events.get()
    yield _sse(chunk(None, event.reason))
    if usage_chunk is not None:
        yield _sse({**usage_chunk, "usage": event.usage()})
    yield _sse("[DONE]")


# ---------------------------------------------------------------- the app


def create_app(
    master: Master,
    *,
    model_name: str,
    api_key: str | None = None,
    max_concurrent: int = 8,
    defaults: ApiDefaults | None = None,
) -> FastAPI:
    """The FastAPI app serving `master`; `serve_api` runs it, tests may run it too."""
    service = Service(master, model_name, max_concurrent, defaults or ApiDefaults())
    app = FastAPI(title="cake", summary="OpenAI-compatible API for a split Llama model")
    app.state.service = service

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _error_response(exc, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return _error_response(ApiError(exc.status_code, str(exc.detail), code=code))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401,
                "missing API key: send it as 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    guarded = [Depends(authorize)]

    @app.get("/health")
    async def health() -> JSONResponse:
        ok, body = await service.health()
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models", dependencies=guarded)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/v1/models/{model:path}", dependencies=guarded)
    async def get_model(model: str) -> dict[str, Any]:
        service.check_model(model)
        return service.model_card()

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatRequest) -> Any:
        service.check_model(body.model)
        body.check_supported()
        messages = [message.as_template_message() for message in body.messages]
        prompt_ids = encode_chat(master.tokenizer, messages)  # the CLI's path for --prompt
        max_tokens = body.max_completion_tokens or body.max_tokens
        generation, first = await service.start(body, prompt_ids, max_tokens, "messages")
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": model_name,
        }
        if not body.stream:
            text, finished = await _collect(generation, first, "messages")
            message = {"role": "assistant", "content": text}
            return {
                **head,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": finished.reason,
                    }
                ],
                "usage": finished.usage(),
            }

        base = {**head, "object": "chat.completion.chunk"}
        if body.include_usage:
            base["usage"] = None  # on every chunk but the last, as OpenAI does

        def chunk(text: str | None, finish: str | None, delta: dict | None = None) -> dict:
            if delta is None:
                delta = {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**base, "choices": [choice]}

        opening = chunk(None, None, {"role": "assistant", "content": ""})
        usage = {**base, "choices": []} if body.include_usage else None
        return EventStream(
            generation, _stream(generation, first, chunk, opening, usage, "messages")
        )

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest) -> Any:
        service.check_model(body.model)
        body.check_supported()
        prompt_ids = _completion_prompt_ids(master, body.prompt)
        generation, first = await service.start(body, prompt_ids, body.max_tokens, "prompt")
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        head["object"] = "text_completion"
        if not body.stream:
            text, finished = await _collect(generation, first, "prompt")
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finished.reason}
            return {**head, "choices": [choice], "usage": finished.usage()}

        base = {**head, "usage": None} if body.include_usage else head

        def chunk(text: str | None, finish: str | None) -> dict:
            choice = {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}
            return {**base, "choices": [choice]}

        usage = {**base, "choices": []} if body.include_usage else None
        return EventStream(generation, _stream(generation, first, chunk, None, usage, "prompt"))

    return app


def _completion_prompt_ids(master: Master, prompt: str | list[str] | list[int]) -> list[int]:
    """Token ids as they are, or the text encoded as the CLI's --raw does (BOS, no template)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        vocab = master.config.vocab_size
        bad = [t for t in prompt if not 0 <= int(t) < vocab]
        if bad:
            raise ApiError(
                400,
                f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})",
                param="prompt",
            )
        return [int(t) for t in prompt]
    text = prompt if isinstance(prompt, str) else str(prompt[0]) if prompt else ""
    return master.encode(text, raw=True)


def _validation_error(errors: Sequence[Any]) -> ApiError:
    """Pydantic's errors as one 400: bad JSON says so; a bad field names the field."""
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        context = (detail.get("ctx") or {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON ({context})".replace(" ()", ""))
    fields = []
    for e in errors:
        loc = [str(part) for part in e.get("loc", ()) if part != "body"]
        fields.append((".".join(loc), e.get("msg", "invalid")))
    message = "; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in fields)
    return ApiError(400, message or "invalid request", param=fields[0][0] if fields else None)


# ---------------------------------------------------------------- serving


def model_id(model: str | Path) -> str:
    """The name clients use: the model folder's name (a .gguf file's name without suffix)."""
    path = Path(model).resolve()
    return path.stem if path.suffix.lower() == ".gguf" else path.name


def api_address(text: str) -> tuple[str, int]:
    """`--api HOST:PORT` as the topology parses addresses, and port 0 (any free port) too."""
    head, sep, port = text.rpartition(":")
    if sep and port == "0":
        return parse_address(f"{head}:1", "--api")[0], 0
    return parse_address(text, "--api")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port), so the real address is known before serving
    and no connection is refused between the log line and uvicorn's start."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ValueError(f"--api {host}:{port}: cannot resolve the host ({exc})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ValueError(
            f"--api {host}:{port}: cannot listen there ({exc.strerror or exc}); "
            "pick another port or stop what uses it"
        ) from None
    return sock


def server_for(app: FastAPI) -> uvicorn.Server:
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    return uvicorn.Server(config)


async def serve_api(opts: dict) -> None:
    """`cake-cli --api HOST:PORT`: open the master, serve the API until SIGINT or SIGTERM."""
    host, port = api_address(opts["api_address"])
    sock = listen(host, port)
    try:
        # several sessions at once: local tensor work off the event loop
        master = await Master.from_options(opts, offload=True)
    except BaseException:
        sock.close()
        raise
    app = create_app(
        master,
        model_name=model_id(opts["model"]),
        api_key=opts["api_key"],
        max_concurrent=opts["max_concurrent"],
        defaults=ApiDefaults.from_options(opts),
    )
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    log.info("API on http://%s:%d (model %r)", shown, bound_port, app.state.service.model_name)
    try:
        await server_for(app).serve(sockets=[sock])
    finally:
        await app.state.service.close()
        await master.close()
        with contextlib.suppress(OSError):
            sock.close()
