"""An Anthropic request as cake's conversation with tools and generation settings.

Anthropic's turns hold blocks: a user turn's `tool_result` blocks become `tool` messages (one
per result, before the turn's text), an assistant turn's `tool_use` blocks its `tool_calls`.
Every request goes through `ToolChat`, tools or not: with none, its prompt is the template's
plain conversation.
"""

from __future__ import annotations

from typing import Any

from cake.faces.api.anthropic.schemas import (
    CountTokensRequest,
    MessagesRequest,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from cake.faces.api.errors import ApiError
from cake.faces.api.schemas import GenerationRequest
from cake.faces.api.tool_chat import (
    ToolChat,
    check_results,
    checked_choice,
    checked_tool,
    checked_tools,
)
from cake.model.tool_calls import ToolChoice

CHOICES = {"auto": "auto", "any": "required", "tool": "required", "none": "none"}


def generation_request(body: MessagesRequest) -> GenerationRequest:
    """The settings `_start` reads, as an OpenAI request would say them."""
    return GenerationRequest(
        model=body.model,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        stop=body.stop_sequences,
        stream=body.stream,
    )


def tool_chat(body: MessagesRequest | CountTokensRequest) -> ToolChat:
    """The conversation, its tools and the choice among them, checked (400 naming the field)."""
    tools = checked_tools(
        [
            checked_tool(tool.name, tool.description, tool.input_schema, f"tools.{i}.input_schema")
            for i, tool in enumerate(body.tools or [])
        ],
        "tools",
    )
    spec = body.tool_choice
    if spec is None:
        choice = ToolChoice("auto" if tools else "none")
    else:
        name = spec.name if spec.type == "tool" else None
        if spec.type == "tool" and not name:
            raise ApiError(
                400, "tool_choice of type 'tool' needs the tool's name", param="tool_choice"
            )
        choice = ToolChoice(CHOICES[spec.type], name, not spec.disable_parallel_tool_use)  # type: ignore[arg-type]
    messages = template_messages(body)
    check_results(messages, "messages")
    return ToolChat(messages, tools, checked_choice(choice, tools, "tool_choice"), "messages")


def template_messages(body: MessagesRequest | CountTokensRequest) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    system = body.system
    if isinstance(system, list):
        system = "".join(block.text for block in system)
    if system:
        messages.append({"role": "system", "content": system})
    for index, message in enumerate(body.messages):
        blocks = (
            [TextBlock(type="text", text=message.content)]
            if isinstance(message.content, str)
            else message.content
        )
        text = "".join(block.text for block in blocks if isinstance(block, TextBlock))
        results = [block for block in blocks if isinstance(block, ToolResultBlock)]
        uses = [block for block in blocks if isinstance(block, ToolUseBlock)]
        misplaced = results if message.role == "assistant" else uses
        if misplaced:
            raise ApiError(
                400,
                f"a {message.role} message cannot hold {misplaced[0].type} blocks (tool_use "
                "blocks are the assistant's, tool_result blocks the user's)",
                param=f"messages.{index}.content",
            )
        messages += [
            {"role": "tool", "tool_call_id": result.tool_use_id, "content": result.text()}
            for result in results
        ]
        if uses:
            calls = [
                {
                    "id": use.id,
                    "type": "function",
                    "function": {"name": use.name, "arguments": use.input},
                }
                for use in uses
            ]
            messages.append({"role": message.role, "content": text or None, "tool_calls": calls})
        elif text or not results:
            messages.append({"role": message.role, "content": text})
    return messages
