"""Mistral (v3 tokenizers and later): `[TOOL_CALLS]` and a JSON list of the calls, opening the
answer:

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]

`[TOOL_CALLS]` is a special token that decoding drops, so the list alone opens the answer too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from cake.model.tool_calls.base import (
    Start,
    ToolCallFormat,
    call_of,
    call_rules,
    json_values,
    lark_string,
    opening_start,
)
from cake.model.tool_calls.types import Tool, ToolCall

TOOL_CALLS = "[TOOL_CALLS]"


class Mistral(ToolCallFormat):
    name = "mistral"

    @classmethod
    def speaks(cls, template: str) -> bool:
        return TOOL_CALLS in template

    def find_start(self, text: str, at_output_start: bool) -> Start:
        return opening_start(text, at_output_start, (TOOL_CALLS, "["))

    def parse(self, region: str) -> list[ToolCall] | None:
        values = json_values(region.strip().removeprefix(TOOL_CALLS))
        if values is None or len(values) != 1 or not isinstance(values[0], list) or not values[0]:
            return None
        calls = [call_of(value, ("arguments", "parameters")) for value in values[0]]
        return None if None in calls else calls  # type: ignore[return-value]

    def grammar(
        self, tools: Sequence[Tool], parallel: bool, special_tokens: Mapping[str, int]
    ) -> str:
        # The marker as the special token the model was trained to write, where it is one.
        token = special_tokens.get(TOOL_CALLS)
        marker = lark_string(TOOL_CALLS) if token is None else f"<[{token}]>"
        calls = 'call (", " call)*' if parallel else "call"
        return (
            "\n".join([f'start: {marker} "[" {calls} "]"', *call_rules(tools, "arguments")]) + "\n"
        )

    def template_messages(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Mistral's templates refuse call ids that are not 9 letters or digits (OpenAI's are
        `call_` and 24 more): each id becomes 9 hex digits of its hash, the same in the call
        and in its result."""
        renamed = []
        for message in messages:
            message = dict(message)
            if message.get("tool_calls"):
                message["tool_calls"] = [
                    {**call, "id": mistral_id(call["id"])} for call in message["tool_calls"]
                ]
            if message.get("tool_call_id"):
                message["tool_call_id"] = mistral_id(message["tool_call_id"])
            renamed.append(message)
        return renamed

    def answer_start(self, name: str | None) -> str:
        if name is None:
            return f'{TOOL_CALLS}[{{"name": "'
        return f'{TOOL_CALLS}[{{"name": {json.dumps(name)}, "arguments":'


def mistral_id(call_id: str) -> str:
    return hashlib.sha256(call_id.encode()).hexdigest()[:9]
