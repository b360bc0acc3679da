"""Qwen 2.5/3 and Hermes: each call on its own in `<tool_call>` tags, a JSON object with the
function's name and arguments, anywhere in the answer:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

It is also the format cake renders tools in for templates that ignore them (`prompt.py`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from cake.model.tool_calls.base import (
    Start,
    ToolCallFormat,
    call_of,
    call_rules,
    lark_string,
    partial_marker,
)
from cake.model.tool_calls.types import Tool, ToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class Hermes(ToolCallFormat):
    name = "hermes"

    @classmethod
    def speaks(cls, template: str) -> bool:
        return OPEN in template

    def find_start(self, text: str, at_output_start: bool) -> Start:
        at = text.find(OPEN)
        return Start(at=at) if at >= 0 else Start(hold=partial_marker(text, OPEN))

    def find_end(self, region: str) -> int | None:
        at = region.find(CLOSE)
        return None if at < 0 else at + len(CLOSE)

    def parse(self, region: str) -> list[ToolCall] | None:
        # An answer that ends (EOS) before the closing tag still holds its call.
        body = region.removeprefix(OPEN).strip().removesuffix(CLOSE)
        try:
            call = call_of(json.loads(body), ("arguments", "parameters"))
        except ValueError:
            return None
        return None if call is None else [call]

    def grammar(
        self, tools: Sequence[Tool], parallel: bool, special_tokens: Mapping[str, int]
    ) -> str:
        # A newline may end the answer too: models trained on Qwen's turns write one after
        # </tool_call>, and without it a newline would commit them to another call.
        start = 'start: tagged ("\\n" tagged)* "\\n"?' if parallel else 'start: tagged "\\n"?'
        tagged = f"tagged: {lark_string(OPEN + chr(10))} call {lark_string(chr(10) + CLOSE)}"
        return "\n".join([start, tagged, *call_rules(tools, "arguments")]) + "\n"

    def answer_start(self, name: str | None) -> str:
        if name is None:
            return f"{OPEN}\n"
        return f'{OPEN}\n{{"name": {json.dumps(name)}, "arguments":'


def render_call(call: Mapping[str, object]) -> str:
    """A call of the history (`{"name", "arguments"}`) as the model would have written it."""
    return f"{OPEN}\n{json.dumps(call, ensure_ascii=False)}\n{CLOSE}"


def render_response(content: str) -> str:
    """A tool's result as Qwen's template shows it to the model (in a user turn)."""
    return f"<tool_response>\n{content}\n</tool_response>"


def tools_instructions(tools: Sequence[Tool], required: str | None) -> str:
    """The system prompt's part that shows the tools, in the words Hermes and Qwen models were
    trained on; `required`: a sentence that says a call is required (or of which function)."""
    listed = "\n".join(json.dumps(tool.as_template_tool(), ensure_ascii=False) for tool in tools)
    lines = [
        "# Tools",
        "",
        "You may call one or more functions to assist with the user query.",
        "",
        "You are provided with function signatures within <tools></tools> XML tags:",
        f"<tools>\n{listed}\n</tools>",
        "",
        "For each function call, return a json object with function name and arguments "
        f"within {OPEN}{CLOSE} XML tags:",
        f'{OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CLOSE}',
    ]
    return "\n".join(lines + ([required] if required else []))
