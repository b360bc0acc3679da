"""The tool parts of a chat request, as OpenAI's clients send them: the tools offered, the
choice among them, and the calls of the history. Shapes only; `tool_chat.py` checks what the
shapes cannot (a result with no call, a choice of a tool not offered)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

# OpenAI's rule for function names; it also keeps them safe inside a prompt and a grammar.
FUNCTION_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str = ""
    parameters: dict[str, Any] | None = None  # a JSON schema of an object; none: no arguments
    strict: bool | None = None


class ToolDefinition(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


ToolChoiceField = Literal["auto", "none", "required"] | NamedToolChoice


class CalledFunction(BaseModel):
    name: str
    arguments: str  # a JSON text, as the API returned it


class MessageToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction
