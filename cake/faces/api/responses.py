"""A generation's events as an HTTP response: one JSON body, or server-sent events in OpenAI's
chunk format. Both end their generation however the response ends."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from cake.decoding.logprobs import TokenLogprobs
from cake.faces.api.errors import generation_error
from cake.faces.api.service import Event, Finished, Generation, Piece


def sse(data: dict[str, Any] | str) -> str:
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


async def _until_disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body was read already: nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(
    request: Request, generation: Generation, first: Event, param: str
) -> tuple[str, Finished, list[TokenLogprobs]]:
    """The whole text and its tokens' logprobs (if asked), for a response that is not
    streamed. A client that hangs up meanwhile stops the generation (after its step in
    flight), which frees its sessions."""
    watcher = asyncio.create_task(_until_disconnected(request))
    watcher.add_done_callback(lambda task: task.cancelled() or generation.stop())
    try:
        pieces: list[str] = []
        logprobs: list[TokenLogprobs] = []
        event = first
        while True:
            if isinstance(event, BaseException):
                raise generation_error(event, param)
            if isinstance(event, Finished):
                return "".join(pieces), event, logprobs
            pieces.append(event.text)
            logprobs.extend(event.logprobs)
            event = await generation.events.get()
    finally:
        watcher.cancel()


async def stream(
    generation: Generation,
    first: Event,
    chunk: Callable[[Piece | None, str | None], dict[str, Any]],
    opening: dict[str, Any] | None,
    usage_chunk: dict[str, Any] | None,
    param: str,
) -> AsyncGenerator[str, None]:
    """SSE lines: `opening` (if any), one chunk per text piece, a last chunk with the
    finish_reason, the usage chunk (if asked), `[DONE]`. A failure ends the stream with an
    error event and no `[DONE]`, so that no client mistakes it for a normal finish."""
    if opening is not None:
        yield sse(opening)
    event = first
    while not isinstance(event, Finished):
        if isinstance(event, BaseException):
            yield sse({"error": generation_error(event, param).body})
            return
        yield sse(chunk(event, None))
        event = await generation.events.get()
    yield sse(chunk(None, event.reason))
    if usage_chunk is not None:
        yield sse({**usage_chunk, "usage": event.usage()})
    yield sse("[DONE]")
