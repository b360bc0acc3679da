"""Tool calls on `/v1/chat/completions`, as OpenAI's clients expect them.

A request's `tools`, `tool_choice` and `parallel_tool_calls`, and its history's calls and
results, become a `ToolChat`. The answer is `message.tool_calls` (`content` the text outside
the calls, or null) with `finish_reason: "tool_calls"`; streamed, text goes out as content
deltas while it cannot be a call, and each call as a `tool_calls` delta with its index, id,
type and name, then its arguments, once the call is complete and checked.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import Request

from cake.faces.api.errors import generation_error
from cake.faces.api.responses import collect, sse
from cake.faces.api.schemas import ChatMessage, ChatRequest
from cake.faces.api.service import Event, Finished, Generation
from cake.faces.api.tool_chat import (
    ToolChat,
    call_id,
    check_results,
    checked_choice,
    checked_tool,
    checked_tools,
)
from cake.faces.api.tool_schemas import MessageToolCall
from cake.model.tool_calls import Piece, ToolCall, ToolChoice


def openai_tool_chat(body: ChatRequest) -> ToolChat:
    """The request's conversation with its tools, checked (400 naming the field otherwise)."""
    tools = checked_tools(
        [
            checked_tool(
                tool.function.name,
                tool.function.description,
                tool.function.parameters,
                f"tools.{index}.function.parameters",
            )
            for index, tool in enumerate(body.tools or [])
        ],
        "tools",
    )
    choice = body.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"  # OpenAI's defaults
    if isinstance(choice, str):
        wanted = ToolChoice(choice, parallel=body.parallel_tool_calls)
    else:
        wanted = ToolChoice("required", choice.function.name, body.parallel_tool_calls)
    messages = [template_message(message) for message in body.messages]
    check_results(messages, "messages")
    return ToolChat(messages, tools, checked_choice(wanted, tools, "tool_choice"), "messages")


def template_message(message: ChatMessage) -> dict[str, Any]:
    """A chat message as chat templates take it: a call's arguments as an object."""
    rendered: dict[str, Any] = message.as_template_message()
    if message.tool_calls:
        rendered["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": arguments(call)},
            }
            for call in message.tool_calls
        ]
    if message.role == "tool":
        rendered["tool_call_id"] = message.tool_call_id
    return rendered


def arguments(call: MessageToolCall) -> dict[str, Any]:
    """A history call's arguments (a JSON text of an object), or the text itself as the one
    argument where it is not one: what the model wrote once is shown to it again."""
    try:
        value = json.loads(call.function.arguments or "{}")
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {"arguments": call.function.arguments}


def call_json(call: ToolCall, index: int) -> dict[str, Any]:
    function = {"name": call.name, "arguments": call.arguments_json()}
    return {"index": index, "id": call_id(), "type": "function", "function": function}


def finish_reason(parser_calls: list[ToolCall], finished: Finished) -> str:
    return "tool_calls" if parser_calls and finished.reason == "stop" else finished.reason


async def tool_chat_response(
    chat: ToolChat, request: Request, generation: Generation, first: Event, head: dict[str, Any]
) -> dict[str, Any]:
    """The whole answer as one `chat.completion`."""
    text, finished, _ = await collect(request, generation, first, chat.param)
    parser, pieces = chat.parser()
    pieces += parser.push(text) + parser.finish()
    content = "".join(piece for piece in pieces if isinstance(piece, str))
    calls = [piece for piece in pieces if isinstance(piece, ToolCall)]
    message: dict[str, Any] = {"role": "assistant", "content": content if content.strip() else None}
    if calls:
        message["tool_calls"] = [
            {key: value for key, value in call_json(call, i).items() if key != "index"}
            for i, call in enumerate(calls)
        ]
    choice = {"index": 0, "message": message, "logprobs": None}
    return {
        **head,
        "object": "chat.completion",
        "choices": [{**choice, "finish_reason": finish_reason(calls, finished)}],
        "usage": finished.usage(),
    }


async def tool_chat_stream(
    chat: ToolChat,
    generation: Generation,
    first: Event,
    base: dict[str, Any],
    include_usage: bool,
) -> AsyncGenerator[str, None]:
    """`chat.completion.chunk` events: content deltas, `tool_calls` deltas, the finish, the
    usage (if asked), `[DONE]`; a failure ends the stream with an error event, as `stream`."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse({**base, "choices": [choice]})

    calls: list[ToolCall] = []

    def chunks(pieces: list[Piece]) -> list[str]:
        out = []
        for piece in pieces:
            if isinstance(piece, str):
                out.append(chunk({"content": piece}))
                continue
            call = call_json(piece, len(calls))
            arguments = call["function"]["arguments"]
            call["function"]["arguments"] = ""  # the name first, then the arguments
            out.append(chunk({"tool_calls": [call]}))
            fragment = {"index": call["index"], "function": {"arguments": arguments}}
            out.append(chunk({"tool_calls": [fragment]}))
            calls.append(piece)
        return out

    yield chunk({"role": "assistant", "content": ""})
    async for item in chat.streamed_pieces(generation, first):
        if isinstance(item, BaseException):
            yield sse({"error": generation_error(item, chat.param).body})
            return
        if isinstance(item, Finished):
            event = item
            break
        for line in chunks(item):
            yield line
    yield chunk({}, finish_reason(calls, event))
    if include_usage:
        yield sse({**base, "choices": [], "usage": event.usage()})
    yield sse("[DONE]")
