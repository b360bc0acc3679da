"""An answer in Anthropic's shapes: a `message` with text and `tool_use` blocks, or its named
server-sent events (message_start, ping, content_block_start/delta/stop, message_delta,
message_stop; `error` if the generation fails once the stream has begun)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import Request

from cake.faces.api.errors import anthropic_error_body, generation_error
from cake.faces.api.responses import collect
from cake.faces.api.service import Event, Finished, Generation
from cake.faces.api.tool_chat import ToolChat, call_id
from cake.model.tool_calls import Piece, ToolCall


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def stop_reason(finished: Finished, called: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) for how the generation ended."""
    if finished.reason == "length":
        return "max_tokens", None
    if finished.stop is not None:
        return "stop_sequence", finished.stop
    return ("tool_use" if called else "end_turn"), None


def block_of(piece: Piece) -> dict[str, Any]:
    if isinstance(piece, str):
        return {"type": "text", "text": piece}
    return {
        "type": "tool_use",
        "id": call_id("toolu_"),
        "name": piece.name,
        "input": dict(piece.arguments),
    }


async def message_response(
    chat: ToolChat, request: Request, generation: Generation, first: Event, model: str
) -> dict[str, Any]:
    text, finished, _ = await collect(request, generation, first, chat.param)
    parser, pieces = chat.parser()
    pieces += parser.push(text) + parser.finish()
    reason, sequence = stop_reason(finished, bool(parser.calls))
    return {
        "id": message_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [block_of(piece) for piece in pieces],
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": {
            "input_tokens": finished.prompt_tokens,
            "output_tokens": finished.completion_tokens,
        },
    }


def event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"


async def message_stream(
    chat: ToolChat, generation: Generation, first: Event, model: str, prompt_tokens: int
) -> AsyncGenerator[str, None]:
    """The events of one answer: a text block is open while text streams; each call is a
    `tool_use` block whose input arrives as one `input_json_delta`."""
    message = {
        "id": message_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": 0},
    }
    yield event("message_start", {"message": message})
    yield event("ping", {})
    blocks = 0  # blocks started so far
    text_open = False
    called = False  # a tool_use block was sent

    def events(pieces: list[Piece]) -> list[str]:
        nonlocal blocks, text_open, called
        out = []
        for piece in pieces:
            if isinstance(piece, str):
                if not text_open:
                    start = {"index": blocks, "content_block": {"type": "text", "text": ""}}
                    out.append(event("content_block_start", start))
                    blocks, text_open = blocks + 1, True
                delta = {"index": blocks - 1, "delta": {"type": "text_delta", "text": piece}}
                out.append(event("content_block_delta", delta))
                continue
            if text_open:
                out.append(event("content_block_stop", {"index": blocks - 1}))
                text_open = False
            out += tool_use_events(piece, blocks)
            blocks, called = blocks + 1, True
        return out

    async for item in chat.streamed_pieces(generation, first):
        if isinstance(item, BaseException):
            yield event("error", anthropic_error_body(generation_error(item, chat.param)))
            return
        if isinstance(item, Finished):
            finished = item
            break
        for line in events(item):
            yield line
    if text_open:
        yield event("content_block_stop", {"index": blocks - 1})
    reason, sequence = stop_reason(finished, called)
    delta = {"stop_reason": reason, "stop_sequence": sequence}
    yield event(
        "message_delta", {"delta": delta, "usage": {"output_tokens": finished.completion_tokens}}
    )
    yield event("message_stop", {})


def tool_use_events(call: ToolCall, index: int) -> list[str]:
    block = {"type": "tool_use", "id": call_id("toolu_"), "name": call.name, "input": {}}
    delta = {"type": "input_json_delta", "partial_json": call.arguments_json()}
    return [
        event("content_block_start", {"index": index, "content_block": block}),
        event("content_block_delta", {"index": index, "delta": delta}),
        event("content_block_stop", {"index": index}),
    ]
