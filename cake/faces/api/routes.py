"""The app and its routes: `POST /v1/chat/completions`, `POST /v1/completions` (both with
`stream: true` as server-sent events), `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`;
Anthropic's `POST /v1/messages` and `POST /v1/messages/count_tokens`.

A route checks what the request asks, takes an admission, encodes the prompt, starts the
generation and shapes the response; the work itself is the service's (`service.py`).
"""

from __future__ import annotations

import hmac
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from cake.decoding.grammar import GrammarSpec
from cake.faces.api.anthropic.conversation import generation_request
from cake.faces.api.anthropic.conversation import tool_chat as anthropic_tool_chat
from cake.faces.api.anthropic.responses import message_response, message_stream
from cake.faces.api.anthropic.schemas import CountTokensRequest, MessagesRequest
from cake.faces.api.errors import ApiError, install_error_handlers
from cake.faces.api.limits import MAX_BODY_BYTES, BodyLimit
from cake.faces.api.logprobs import chat_logprobs, completion_logprobs
from cake.faces.api.openai_tools import openai_tool_chat, tool_chat_response, tool_chat_stream
from cake.faces.api.responses import EventStream, collect, stream
from cake.faces.api.schemas import ApiDefaults, ChatRequest, CompletionRequest, GenerationRequest
from cake.faces.api.service import Event, Generation, Piece, Service
from cake.faces.webchat import mount_webchat
from cake.master import Master


def create_app(
    master: Master,
    *,
    model_name: str,
    api_key: str | None = None,
    max_concurrent: int = 8,
    defaults: ApiDefaults | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The FastAPI app serving `master`; `serve_api` runs it, tests may run it too. More
    routers (a web page, a status view) mount with one `app.include_router(...)` and find the
    service as `request.app.state.service` (`service_of`) and the key check in `authorize`."""
    app = FastAPI(title="cake", summary="OpenAI-compatible API for a split Llama model")
    app.state.service = Service(master, model_name, max_concurrent, defaults or ApiDefaults())
    app.state.api_key = api_key
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.include_router(health_router)
    app.include_router(openai_router)
    app.include_router(anthropic_router)
    # The chat page at /, its status behind the same key check as /v1.
    mount_webchat(app, api_key_required=api_key is not None, authorize=authorize)
    return app


def service_of(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service_of)]


def api_key_problem(request: Request) -> str | None:
    """The one check of the API key (the /v1 routes, /health's details, the chat page's
    status): None when the request's `Authorization: Bearer <key>` or `x-api-key: <key>`
    carries the server's key (or the server has none), else what a 401 says is wrong.
    Compared in constant time."""
    api_key: str | None = request.app.state.api_key
    if api_key is None:
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    is_bearer = scheme.lower() == "bearer"
    if not is_bearer or not token:  # Anthropic's clients send it as x-api-key
        is_bearer, token = True, request.headers.get("x-api-key", "")
    if is_bearer and hmac.compare_digest(token.strip().encode(), api_key.encode()):
        return None
    if not token:
        return "missing API key: send it as 'Authorization: Bearer <key>' (or 'x-api-key: <key>')"
    return "incorrect API key"


def is_authorized(request: Request) -> bool:
    """Whether the request carries the API key (always, when the server has none)."""
    return api_key_problem(request) is None


def authorize(request: Request) -> None:
    """A dependency: 401 in OpenAI's shape (with WWW-Authenticate: Bearer) unless the request
    carries the API key."""
    problem = api_key_problem(request)
    if problem is not None:
        raise ApiError(401, problem, code="invalid_api_key")


health_router = APIRouter()
openai_router = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])
anthropic_router = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])


@health_router.get("/health")
async def health(request: Request, service: ServiceDep) -> JSONResponse:
    """Up or not, for anyone; which workers, where, and how busy, only with the key."""
    ok, body = await service.health()
    if not is_authorized(request):
        body = {"status": body["status"]}
    return JSONResponse(body, status_code=200 if ok else 503)


@openai_router.get("/models")
async def list_models(service: ServiceDep) -> dict[str, Any]:
    return {"object": "list", "data": [service.model_card()]}


@openai_router.get("/models/{model:path}")
async def get_model(model: str, service: ServiceDep) -> dict[str, Any]:
    service.check_model(model)
    return service.model_card()


async def _start(
    service: Service,
    body: GenerationRequest,
    param: str,
    encode: Callable[[], Awaitable[list[int]]],
    tool_grammar: GrammarSpec | None = None,
) -> tuple[Generation, Event]:
    """Checks, admission (429 before any work), the grammar's compilation, encoding, the
    length checks, the start. `tool_grammar`: a required tool call's, in place of
    response_format's."""
    service.check_model(body.model)
    body.check_supported()
    stops = body.stop_strings()
    params = service.defaults.sampling(body)
    draft = service.draft_settings(body)
    grammar, logprobs = tool_grammar or body.grammar(), body.logprob_count()
    admission = service.admit()
    try:
        await service.check_request(grammar, logprobs, "tools" if tool_grammar else None)
        prompt_ids = await encode()
        max_tokens = service.completion_budget(len(prompt_ids), body.requested_max_tokens(), param)
        return await service.start(
            admission,
            prompt_ids,
            params,
            max_tokens,
            stops,
            param,
            draft,
            grammar=grammar,
            logprobs=logprobs,
        )
    except BaseException:
        admission.release()  # a generation that started releases it when it ends
        raise


@openai_router.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, service: ServiceDep) -> Any:
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": service.model_name,
    }
    if body.uses_tools():
        return await tool_chat_completions(body, request, service, head)
    messages = [message.as_template_message() for message in body.messages]
    encode = partial(service.encode_chat, messages)
    generation, first = await _start(service, body, "messages", encode)
    with_logprobs = body.logprob_count() is not None
    if not body.stream:
        text, finished, records = await collect(request, generation, first, "messages")
        message = {"role": "assistant", "content": text}
        logprobs = chat_logprobs(records, service.token_bytes) if with_logprobs else None
        choice = {"index": 0, "message": message, "logprobs": logprobs}
        return {
            **head,
            "object": "chat.completion",
            "choices": [{**choice, "finish_reason": finished.reason}],
            "usage": finished.usage(),
        }

    base = {**head, "object": "chat.completion.chunk"}
    if body.include_usage:
        base["usage"] = None  # on every chunk but the last, as OpenAI does

    def chunk(piece: Piece | None, finish: str | None, delta: dict | None = None) -> dict:
        if delta is None:
            delta = {} if piece is None else {"content": piece.text}
        logprobs = None
        if with_logprobs and piece is not None:
            logprobs = chat_logprobs(piece.logprobs, service.token_bytes)
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**base, "choices": [choice]}

    opening = chunk(None, None, {"role": "assistant", "content": ""})
    usage = {**base, "choices": []} if body.include_usage else None
    return EventStream(generation, stream(generation, first, chunk, opening, usage, "messages"))


async def tool_chat_completions(
    body: ChatRequest, request: Request, service: ServiceDep, head: dict[str, Any]
) -> Any:
    """A chat with tools (openai_tools.py): the same checks, admission and start."""
    chat = openai_tool_chat(body)
    grammar = await chat.grammar(service)
    encode = partial(chat.encode, service, grammar is not None)
    generation, first = await _start(service, body, chat.param, encode, grammar)
    if not body.stream:
        return await tool_chat_response(chat, request, generation, first, head)
    base = {**head, "object": "chat.completion.chunk"}
    if body.include_usage:
        base["usage"] = None
    events = tool_chat_stream(chat, generation, first, base, body.include_usage)
    return EventStream(generation, events)


@openai_router.post("/completions")
async def completions(body: CompletionRequest, request: Request, service: ServiceDep) -> Any:
    encode = partial(service.encode_completion, body.prompt)
    generation, first = await _start(service, body, "prompt", encode)
    head = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": service.model_name,
    }
    with_logprobs = body.logprob_count() is not None
    if not body.stream:
        text, finished, records = await collect(request, generation, first, "prompt")
        logprobs = completion_logprobs(records, service.token_bytes) if with_logprobs else None
        choice = {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finished.reason}
        return {**head, "choices": [choice], "usage": finished.usage()}

    base = {**head, "usage": None} if body.include_usage else head
    sent = [0]  # characters streamed so far: where the next chunk's text_offset starts

    def chunk(piece: Piece | None, finish: str | None) -> dict:
        logprobs = None
        if with_logprobs and piece is not None:
            logprobs = completion_logprobs(piece.logprobs, service.token_bytes, sent[0])
            sent[0] += len(piece.text)
        text = piece.text if piece is not None else ""
        choice = {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}
        return {**base, "choices": [choice]}

    usage = {**base, "choices": []} if body.include_usage else None
    return EventStream(generation, stream(generation, first, chunk, None, usage, "prompt"))


@anthropic_router.post("/messages")
async def messages(body: MessagesRequest, request: Request, service: ServiceDep) -> Any:
    """Anthropic's Messages API (anthropic/): the same checks, admission and start."""
    chat = anthropic_tool_chat(body)
    grammar = await chat.grammar(service)
    encode = partial(chat.encode, service, grammar is not None)
    generation, first = await _start(service, generation_request(body), chat.param, encode, grammar)
    if not body.stream:
        return await message_response(chat, request, generation, first, service.model_name)
    prompt_tokens = len(chat.prompt.ids) if chat.prompt else 0
    events = message_stream(chat, generation, first, service.model_name, prompt_tokens)
    return EventStream(generation, events)


@anthropic_router.post("/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, service: ServiceDep) -> dict[str, int]:
    service.check_model(body.model)
    chat = anthropic_tool_chat(body)
    # (as the generation's prompt: a required call comes under a grammar, no answer start)
    return {"input_tokens": len(await chat.encode(service, chat.choice.forced))}
