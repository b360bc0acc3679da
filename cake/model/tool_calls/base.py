"""What a tool-call format is, and the JSON helpers the formats share.

A format answers four questions about a model family's tool calls: where in the output a call
can begin (`find_start`), where it ends (`find_end`), which calls a complete call's text holds
(`parse`), and the grammar that makes the model write valid ones (`grammar`). The streaming
parser (`parser.py`) asks them as text arrives; the prompt (`prompt.py`) asks `answer_start`
for what to write at the start of a forced answer when no grammar is used.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from cake.model.tool_calls.types import Tool, ToolCall


@dataclass(frozen=True)
class Start:
    """Where a call begins in the text seen so far (`at`), or, when none does yet, how many
    characters at its end could still be the beginning of one (`hold`); `never`: no call can
    begin from here on (a format whose calls open the output, once text came first)."""

    at: int | None = None
    hold: int = 0
    never: bool = False


class ToolCallFormat(ABC):
    """One family's way of writing tool calls. Stateless: the parser keeps the state."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def speaks(cls, template: str) -> bool:
        """Whether a chat template's text renders tools in this format."""

    @abstractmethod
    def find_start(self, text: str, at_output_start: bool) -> Start:
        """Where a call starts in `text` (text not yet sent); `at_output_start`: nothing but
        whitespace came before it in the output."""

    def find_end(self, region: str) -> int | None:
        """The length of the first complete call region at the start of `region`, or None
        while it is not complete (by default a region runs to the end of the output)."""
        return None

    @abstractmethod
    def parse(self, region: str) -> list[ToolCall] | None:
        """The calls a complete region holds (any names; the parser checks them), or None
        when it is no valid call."""

    @abstractmethod
    def grammar(
        self, tools: Sequence[Tool], parallel: bool, special_tokens: Mapping[str, int]
    ) -> str:
        """A grammar in llguidance's Lark syntax that accepts exactly a call of one of `tools`
        (several, if `parallel`), arguments valid under each tool's schema. `special_tokens`:
        the ids of the format's marker tokens that the vocabulary has as special tokens."""

    def template_messages(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The conversation as this family's template takes it (by default, as it is)."""
        return list(messages)

    @abstractmethod
    def answer_start(self, name: str | None) -> str:
        """The start of an answer that can only go on as a call (of `name`, if given): written
        into the prompt when a call is required and no grammar makes the model write one."""


def partial_marker(text: str, marker: str) -> int:
    """The length of the longest end of `text` that `marker` begins with (held back: the next
    piece may complete the marker)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def opening_start(text: str, at_output_start: bool, openers: Sequence[str]) -> Start:
    """`find_start` for formats whose calls open the output (after whitespace) with one of
    `openers`: any other first character means the answer is text."""
    if not at_output_start:
        return Start(never=True)
    stripped = text.lstrip()
    if any(stripped.startswith(opener) for opener in openers):
        return Start(at=0)  # the whitespace before goes with the call
    if not stripped or any(opener.startswith(stripped) for opener in openers):
        return Start(hold=len(text))
    return Start(never=True)


def call_of(value: Any, argument_keys: Sequence[str]) -> ToolCall | None:
    """A ToolCall from `{"name": ..., <argument key>: {...}}`, the arguments an object or a
    JSON text of one (some models write them as a string); None if it is neither."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    key = next((k for k in argument_keys if k in value), None)
    arguments = {} if key is None else value[key]
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], arguments)


def json_values(text: str, separators: str = ";,") -> list[Any] | None:
    """The JSON values in `text`, one after another, separated by whitespace or one of
    `separators`; None if anything else is there."""
    decoder = json.JSONDecoder()
    values, at = [], 0
    while True:
        while at < len(text) and (text[at].isspace() or (values and text[at] in separators)):
            at += 1
        if at == len(text):
            return values
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        values.append(value)


# Whitespace as json.dumps writes it (what models saw most) and no other: flexible whitespace
# would let a small model pad a call with newlines until it runs out of tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
DEFINITIONS = ("$defs", "definitions")  # where a schema's local $refs point ("#/$defs/...")


def call_schema(tool: Tool, argument_key: str) -> str:
    """The JSON schema of a call of `tool`: its name, a constant, and its arguments. The
    parameters' own definitions move to the root, where their `#/$defs/...` refs point."""
    parameters = {k: v for k, v in tool.parameters.items() if k not in DEFINITIONS}
    schema = {
        "x-guidance": JSON_OPTIONS,
        "type": "object",
        "properties": {"name": {"const": tool.name}, argument_key: parameters},
        "required": ["name", argument_key],
        "additionalProperties": False,
        **{k: v for k, v in tool.parameters.items() if k in DEFINITIONS},
    }
    return json.dumps(schema, ensure_ascii=False)


def call_rules(tools: Sequence[Tool], argument_key: str) -> list[str]:
    """Grammar rules: `call` is a call of one of `tools`, each an embedded JSON schema
    (llguidance merges alternatives of `%json` into one, as an anyOf would)."""
    rules = [f"call: {' | '.join(f'tool_{i}' for i in range(len(tools)))}"]
    rules += [f"tool_{i}: %json {call_schema(tool, argument_key)}" for i, tool in enumerate(tools)]
    return rules


def lark_string(text: str) -> str:
    """A Lark string literal for `text`."""
    return json.dumps(text, ensure_ascii=False)
