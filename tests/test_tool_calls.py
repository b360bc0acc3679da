"""Tool calls per family, without a model: the parser of every format (split == whole, however
the output streams in), the format each template speaks, the prompt cake writes for templates
that ignore tools, and the grammar of a forced call (what llguidance accepts and refuses)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from tool_templates import LLAMA31_STYLE, MISTRAL_STYLE, PLAIN, QWEN_STYLE
from transformers import AutoTokenizer

from cake.model.tool_calls import Tool, ToolCall, ToolCallParser, ToolChoice, encode_tool_chat
from cake.model.tool_calls.base import ToolCallFormat
from cake.model.tool_calls.formats import format_for_template
from cake.model.tool_calls.hermes import Hermes
from cake.model.tool_calls.llama3 import Llama3Json
from cake.model.tool_calls.mistral import Mistral
from cake.model.tool_calls.prompt import tool_format_of

WEATHER = Tool(
    "get_weather",
    "The weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
TIME = Tool("get_time")  # no arguments
TOOLS = [WEATHER, TIME]
PARIS = ToolCall("get_weather", {"city": "Paris"})


def parsed(fmt: ToolCallFormat, output: str, size: int, parallel: bool = True) -> list[Any]:
    """The pieces of `output` streamed in pieces of `size` characters, text merged."""
    parser = ToolCallParser(fmt, TOOLS, parallel)
    pieces = []
    for at in range(0, len(output), size):
        pieces += parser.push(output[at : at + size])
    pieces += parser.finish()
    merged: list[Any] = []
    for piece in pieces:
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        else:
            merged.append(piece)
    return merged


HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
UNKNOWN_CALL = '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>'

CASES = [
    (Hermes(), "Just text, no call.", ["Just text, no call."]),
    (Hermes(), HERMES_CALL, [PARIS]),
    (Hermes(), f"Let me look.\n{HERMES_CALL}\n", ["Let me look.\n", PARIS]),
    (
        Hermes(),
        f'{HERMES_CALL}\n<tool_call>\n{{"name": "get_time", "arguments": "{{}}"}}\n</tool_call>',
        [PARIS, ToolCall("get_time", {})],  # arguments as a JSON string, as some models write
    ),
    (Hermes(), HERMES_CALL.removesuffix("</tool_call>"), [PARIS]),  # EOS before the tag
    (Hermes(), UNKNOWN_CALL, [UNKNOWN_CALL]),  # a tool nobody offered: text
    (Hermes(), HERMES_CALL[:40], [HERMES_CALL[:40]]),  # cut off (max_tokens): text
    (
        Hermes(),
        "<tool_call>\nnot json\n</tool_call> ok",
        ["<tool_call>\nnot json\n</tool_call> ok"],
    ),
    (Hermes(), "a <tool_ b", ["a <tool_ b"]),  # a marker's start that came to nothing
    (Llama3Json(), '{"name": "get_weather", "parameters": {"city": "Paris"}}', [PARIS]),
    (
        Llama3Json(),
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        [PARIS],
    ),
    (
        Llama3Json(),
        ' {"name": "get_time", "parameters": {}}; '
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        [ToolCall("get_time", {}), PARIS],
    ),
    (Llama3Json(), "The answer is {1, 2}.", ["The answer is {1, 2}."]),  # text first: text
    (Llama3Json(), '{"not": "a call"}', ['{"not": "a call"}']),
    (Mistral(), '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', [PARIS]),
    (  # [TOOL_CALLS] is a special token: decoded, the answer starts with the list
        Mistral(),
        '[{"name": "get_time", "arguments": {}}, '
        '{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        [ToolCall("get_time", {}), PARIS],
    ),
    (Mistral(), "[1] is a footnote.", ["[1] is a footnote."]),
]


@pytest.mark.parametrize(("fmt", "output", "expected"), CASES)
def test_the_parser_finds_the_calls_however_the_output_streams(
    fmt: ToolCallFormat, output: str, expected: list[Any]
) -> None:
    for size in range(1, len(output) + 1):
        assert parsed(fmt, output, size) == expected, size


def test_text_streams_on_until_it_could_be_a_call() -> None:
    hermes = ToolCallParser(Hermes(), TOOLS)
    assert hermes.push("Let me check <tool") == ["Let me check "]  # "<tool" held back
    assert hermes.push("_call>\n{") == []
    assert hermes.push('"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>') == [
        PARIS
    ]
    assert hermes.push("\n\nIt is sunny.") == ["It is sunny."]  # whitespace after a call dropped
    llama = ToolCallParser(Llama3Json(), TOOLS)
    assert llama.push("  ") == []  # the answer may still open with a call
    assert llama.push("Sure, {") == ["  Sure, {"]  # text: a call only opens the answer
    assert llama.push('"name": "get_time"}') == ['"name": "get_time"}']


def test_without_parallel_calls_only_the_first_counts() -> None:
    output = f"{HERMES_CALL}\n{HERMES_CALL.replace('Paris', 'Rome')}"
    assert parsed(Hermes(), output, 7, parallel=False) == [PARIS]


@pytest.mark.parametrize(
    ("template", "name"),
    [
        (PLAIN, None),
        (QWEN_STYLE, "hermes"),
        (LLAMA31_STYLE, "llama3_json"),
        (MISTRAL_STYLE, "mistral"),
    ],
)
def test_each_template_speaks_its_format(template: str, name: str | None) -> None:
    fmt = format_for_template(template)
    assert (fmt.name if fmt else None) == name


@pytest.fixture(scope="module")
def tokenizer(llama3_tokenizer_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(llama3_tokenizer_dir)


def with_template(tokenizer: Any, template: str | None) -> Any:
    """The tokenizer with this chat template (a copy: formats are probed once per tokenizer)."""
    copied = copy.copy(tokenizer)
    copied.chat_template = template
    return copied


HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and the time?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            },
            {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": {}}},
        ],
    },
    {"role": "tool", "tool_call_id": "a", "content": "sunny"},
    {"role": "tool", "tool_call_id": "b", "content": "noon"},
]


def test_cake_renders_tools_for_a_template_that_ignores_them(tokenizer: Any) -> None:
    """SmolLM2's kind of template: the tools in the system turn, the history's calls and
    results in Hermes tags (both results in one user turn), as Qwen's template writes them."""
    plain = with_template(tokenizer, PLAIN)
    assert not tool_format_of(plain).native
    prompt = encode_tool_chat(plain, HISTORY, TOOLS, ToolChoice())
    text = plain.decode(prompt.ids)
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert json.dumps(WEATHER.as_template_tool()) in system
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        in text
    )
    results = "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nnoon\n</tool_response>"
    assert f"<|im_start|>user\n{results}<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n") and prompt.answer_start == ""
    # tool_choice none: the tools are not shown (the history still is)
    hidden = plain.decode(encode_tool_chat(plain, HISTORY, TOOLS, ToolChoice("none")).ids)
    assert "get_weather" in hidden and "# Tools" not in hidden


@pytest.mark.parametrize(
    ("template", "answer_start"),
    [
        (PLAIN, '<tool_call>\n{"name": "get_time", "arguments":'),
        (QWEN_STYLE, '<tool_call>\n{"name": "get_time", "arguments":'),
        (LLAMA31_STYLE, '{"name": "get_time", "parameters":'),
        (MISTRAL_STYLE, '[TOOL_CALLS][{"name": "get_time", "arguments":'),
    ],
)
def test_a_forced_call_without_a_grammar_opens_the_answer(
    tokenizer: Any, template: str, answer_start: str
) -> None:
    """The template's own rendering where it has one (the probe tool appears), and a named
    call's start written after the open assistant turn; with a grammar, nothing is."""
    templated = with_template(tokenizer, template)
    choice = ToolChoice("required", "get_time")
    prompt = encode_tool_chat(templated, HISTORY[1:2], TOOLS, choice)
    assert prompt.answer_start == answer_start
    assert templated.decode(prompt.ids).endswith(answer_start)
    assert "get_weather" in templated.decode(prompt.ids)  # every tool is shown
    with_grammar = encode_tool_chat(templated, HISTORY[1:2], TOOLS, choice, grammar=True)
    assert with_grammar.answer_start == ""
    assert with_grammar.ids == prompt.ids[: len(with_grammar.ids)]


@pytest.fixture(scope="module")
def accepts(tokenizer: Any) -> Any:
    """accepts(grammar, text): whether llguidance takes `text`'s tokens to the grammar's end."""
    import llguidance
    import llguidance.hf

    lltokenizer = llguidance.hf.from_tokenizer(tokenizer)

    def check(grammar: str, text: str) -> bool:
        matcher = llguidance.LLMatcher(
            lltokenizer, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0
        )
        assert not matcher.is_error(), matcher.get_error()
        ids = tokenizer.encode(text, add_special_tokens=False)
        return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()

    return check


def hermes_call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


@pytest.mark.slow  # llguidance's view of a 128k vocabulary takes ~2 s to build
@pytest.mark.parametrize(
    ("fmt", "call", "join"),
    [
        (Hermes(), hermes_call, "\n"),
        (Llama3Json(), lambda n, a: f'{{"name": "{n}", "parameters": {a}}}', "; "),
        (Mistral(), lambda n, a: f'{{"name": "{n}", "arguments": {a}}}', ", "),
    ],
)
def test_the_grammar_of_a_forced_call(
    fmt: ToolCallFormat, call: Any, join: str, accepts: Any
) -> None:
    """A call of an offered tool with arguments valid under its schema, and nothing else;
    several only when parallel calls are allowed."""
    wrap = (
        (lambda calls: f"[TOOL_CALLS][{calls}]") if fmt.name == "mistral" else (lambda calls: calls)
    )
    paris, noon = call("get_weather", '{"city": "Paris"}'), call("get_time", "{}")
    one = fmt.grammar(TOOLS, parallel=False, special_tokens={})
    several = fmt.grammar(TOOLS, parallel=True, special_tokens={})
    assert accepts(one, wrap(paris)) and accepts(one, wrap(noon))
    assert accepts(several, wrap(join.join([paris, noon])))
    assert not accepts(one, wrap(join.join([paris, noon])))
    assert not accepts(one, wrap(call("get_weather", "{}")))  # "city" is required
    assert not accepts(one, wrap(call("get_weather", '{"city": 7}')))
    assert not accepts(one, wrap(call("rm_rf", "{}")))
    assert not accepts(one, "It is sunny.")
    named = fmt.grammar([WEATHER], parallel=False, special_tokens={})
    assert accepts(named, wrap(paris)) and not accepts(named, wrap(noon))


def test_mistral_gets_the_call_ids_its_template_takes(tokenizer: Any) -> None:
    """OpenAI's call ids (`call_…`) become 9 hex digits, the same in a call and its result."""
    mistral = with_template(tokenizer, MISTRAL_STYLE)
    history = [*HISTORY[1:], {"role": "user", "content": "And now?"}]
    text = mistral.decode(encode_tool_chat(mistral, history, TOOLS, ToolChoice()).ids)
    assert '[TOOL_CALLS][{"name": "get_weather"' in text and "[TOOL_RESULTS]sunny" in text
    renamed = Mistral().template_messages(history)
    assert [call["id"] for call in renamed[1]["tool_calls"]] == [
        renamed[2]["tool_call_id"],
        renamed[3]["tool_call_id"],
    ]
    assert all(len(call["id"]) == 9 and call["id"].isalnum() for call in renamed[1]["tool_calls"])
