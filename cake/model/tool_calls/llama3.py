"""Llama 3.1, 3.2 and 3.3 with JSON tool calling: the whole answer is a JSON object with the
function's name and its `parameters`, maybe after the `<|python_tag|>` token (which decoding
drops, as it drops every special token), several separated by `;`:

    {"name": "get_weather", "parameters": {"city": "Paris"}}

A call opens the answer: an answer that starts with anything else is text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from cake.model.tool_calls.base import (
    Start,
    ToolCallFormat,
    call_of,
    call_rules,
    json_values,
    opening_start,
)
from cake.model.tool_calls.types import Tool, ToolCall

PYTHON_TAG, END_OF_MESSAGE = "<|python_tag|>", "<|eom_id|>"


class Llama3Json(ToolCallFormat):
    name = "llama3_json"

    @classmethod
    def speaks(cls, template: str) -> bool:
        return PYTHON_TAG in template or '"parameters": dictionary' in template

    def find_start(self, text: str, at_output_start: bool) -> Start:
        return opening_start(text, at_output_start, (PYTHON_TAG, "{"))

    def parse(self, region: str) -> list[ToolCall] | None:
        body = region.strip().removeprefix(PYTHON_TAG).removesuffix(END_OF_MESSAGE)
        values = json_values(body)
        if len(values or []) == 1 and isinstance(values[0], list):
            values = values[0]  # [{...}, {...}]
        if not values:
            return None
        calls = [call_of(value, ("parameters", "arguments")) for value in values]
        return None if None in calls else calls  # type: ignore[return-value]

    def grammar(
        self, tools: Sequence[Tool], parallel: bool, special_tokens: Mapping[str, int]
    ) -> str:
        start = 'start: call ("; " call)*' if parallel else "start: call"
        return "\n".join([start, *call_rules(tools, "parameters")]) + "\n"

    def answer_start(self, name: str | None) -> str:
        if name is None:
            return '{"name": "'
        return f'{{"name": {json.dumps(name)}, "parameters":'
