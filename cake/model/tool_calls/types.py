"""A tool, a call of one, and what the caller lets the model do with them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# The schema of a function that takes no arguments: an empty object (and no other, so that a
# grammar lets a model write nothing else).
NO_PARAMETERS: Mapping[str, Any] = {
    "type": "object",
    "properties": {},
    "additionalProperties": False,
}


@dataclass(frozen=True)
class Tool:
    """A function the model may call; `parameters` is the JSON schema of its arguments (an
    object)."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: dict(NO_PARAMETERS))

    def as_template_tool(self) -> dict[str, Any]:
        """The form chat templates take (`apply_chat_template(tools=...)`): OpenAI's."""
        function = {"name": self.name, "description": self.description}
        return {"type": "function", "function": {**function, "parameters": dict(self.parameters)}}


@dataclass(frozen=True)
class ToolCall:
    """A call the model wrote: a known tool's name and its arguments (a JSON object)."""

    name: str
    arguments: Mapping[str, Any]

    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass(frozen=True)
class ToolChoice:
    """What the model may do: `auto` (answer or call), `none` (answer), `required` (call; of
    the function `name` if given). `parallel`: more than one call in an answer."""

    mode: Literal["auto", "none", "required"] = "auto"
    name: str | None = None
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.mode == "required"

    def allowed(self, tools: list[Tool]) -> list[Tool]:
        """The tools the answer may call."""
        if self.mode == "none":
            return []
        return [tool for tool in tools if self.name is None or tool.name == self.name]
