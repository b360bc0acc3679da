"""A conversation with tools, whichever API it came through: the checks that the request's
shapes cannot make, its encoding, and the parser of its answer.

OpenAI's chat completions (`openai_tools.py`) and Anthropic's messages (`anthropic/`) turn
their requests into a `ToolChat` (Hugging Face chat messages, cake's `Tool`s and
`ToolChoice`), and its answer's pieces (text, `ToolCall`s) into their own shapes.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from cake.decoding.grammar import GrammarSpec
from cake.faces.api.errors import ApiError
from cake.faces.api.service import Event, Finished, Generation, Service
from cake.model.tool_calls import (
    Piece,
    Tool,
    ToolCallParser,
    ToolChoice,
    ToolPrompt,
    encode_tool_chat,
)
from cake.model.tool_calls.prompt import ToolPromptError, special_tokens, tool_format_of


def call_id(prefix: str = "call_") -> str:
    """A new call's id (OpenAI's `call_…`, Anthropic's `toolu_…`)."""
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def checked_tool(name: str, description: str, schema: Any, param: str) -> Tool:
    """A tool whose parameters are a JSON schema of an object (absent: no arguments), else 400
    naming `param`. The schema's own keywords are the grammar's to check, when it is used."""
    if schema is None:
        return Tool(name, description)
    problem = None
    if not isinstance(schema, dict):
        problem = "must be a JSON schema (an object)"
    elif schema.get("type", "object") != "object":
        problem = f"must be the schema of an object (type 'object'), not {schema.get('type')!r}"
    elif not isinstance(schema.get("properties", {}), dict):
        problem = "has 'properties' that is not an object"
    elif not isinstance(schema.get("required", []), list) or not all(
        isinstance(key, str) for key in schema.get("required", [])
    ):
        problem = "has 'required' that is not a list of property names"
    if problem is not None:
        raise ApiError(400, f"the parameters of the tool {name!r} {problem}", param=param)
    return Tool(name, description, schema)


def checked_tools(tools: list[Tool], param: str) -> list[Tool]:
    names = [tool.name for tool in tools]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ApiError(400, f"tools are named {twice} more than once", param=param)
    return tools


def checked_choice(choice: ToolChoice, tools: list[Tool], param: str) -> ToolChoice:
    """A choice that the tools allow: a call required of tools that exist, of a named one."""
    if choice.mode == "required" and not tools:
        raise ApiError(400, "a tool call is required, but no tools are given", param=param)
    if choice.name is not None and choice.name not in {tool.name for tool in tools}:
        offered = ", ".join(repr(tool.name) for tool in tools) or "none"
        raise ApiError(
            400,
            f"the tool choice names {choice.name!r}, which is not among the tools ({offered})",
            param=param,
        )
    return choice


def check_results(messages: Sequence[dict[str, Any]], param: str) -> None:
    """Every tool result answers a call of an earlier assistant turn (by its id)."""
    called: set[str] = set()
    for index, message in enumerate(messages):
        called.update(call["id"] for call in message.get("tool_calls") or [])
        if message["role"] == "tool" and message.get("tool_call_id") not in called:
            raise ApiError(
                400,
                f"the tool result answers the call {message.get('tool_call_id')!r}, but no "
                "earlier assistant message made a call with that id",
                param=f"{param}.{index}",
            )


@dataclass
class ToolChat:
    """A conversation with tools; `encode` renders it (and keeps the prompt for the parser)."""

    messages: list[dict[str, Any]]
    tools: list[Tool]
    choice: ToolChoice
    param: str  # the request's field of the conversation, for errors
    prompt: ToolPrompt | None = field(default=None, init=False)

    async def encode(self, service: Service, grammar: bool = False) -> list[int]:
        try:
            self.prompt = await service.on_tokenizer_thread(
                encode_tool_chat,
                service.master.tokenizer,
                self.messages,
                self.tools,
                self.choice,
                grammar,
            )
        except ToolPromptError as exc:
            raise ApiError(400, str(exc), param=self.param) from None
        return self.prompt.ids

    async def grammar(self, service: Service) -> GrammarSpec | None:
        """The grammar of a required call (tool_choice required, or a named function) in the
        model's own format, so that even a small model writes a valid call of an offered
        tool; None when the model may answer freely."""
        if not self.choice.forced:
            return None
        tokenizer = service.master.tokenizer
        rendering = await service.on_tokenizer_thread(tool_format_of, tokenizer)
        allowed = self.choice.allowed(self.tools)
        # A named function is called once: small models, free to go on, repeat the call.
        parallel = self.choice.parallel and self.choice.name is None
        source = rendering.format.grammar(allowed, parallel, special_tokens(tokenizer))
        return GrammarSpec("lark", source)

    def parser(self) -> tuple[ToolCallParser, list[Piece]]:
        """The answer's parser, and the pieces of the answer's start written in the prompt."""
        assert self.prompt is not None, "encode first"
        parser = ToolCallParser(
            self.prompt.format, self.choice.allowed(self.tools), self.choice.parallel
        )
        return parser, parser.push(self.prompt.answer_start)

    async def streamed_pieces(
        self, generation: Generation, first: Event
    ) -> AsyncIterator[list[Piece] | Finished | BaseException]:
        """A streamed answer as both APIs shape it: the parsed pieces, batch by batch as the
        text arrives (the answer's start written in the prompt first), then how it ended: the
        generation's Finished, or what went wrong."""
        parser, pieces = self.parser()
        yield pieces
        item = first
        while not isinstance(item, Finished):
            if isinstance(item, BaseException):
                yield item
                return
            yield parser.push(item.text)
            item = await generation.events.get()
        yield parser.finish()
        yield item
