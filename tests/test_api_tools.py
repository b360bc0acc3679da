"""Tool calls on /v1/chat/completions and Anthropic's /v1/messages, through the official
`openai` and `anthropic` SDKs against a real server serving SmolLM2 (its template is plain
ChatML, so cake renders the tools in the Hermes style).

What the API makes of an answer (a call, text around it, a call of a tool nobody offered) is
tested with scripted answers (`ScriptedAnswers`: the answer's text as the model's tokens), since
no 135M model writes them on cue; the model itself answers the rest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from api_server import API_KEY, ScriptedAnswers, Server, api_in_thread, post

pytestmark = pytest.mark.slow  # a server with the real model

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city's name"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def scripted_server(smollm2_dir: Path) -> Iterator[tuple[Server, ScriptedAnswers]]:
    box: list[ScriptedAnswers] = []
    with api_in_thread(
        smollm2_dir,
        prepare=lambda master: box.append(ScriptedAnswers(master)),
        api_key=API_KEY,
        master_options={"max_seq_len": 1024},
    ) as server:
        yield server, box[0]


@pytest.fixture
def served(scripted_server: tuple[Server, ScriptedAnswers]) -> Server:
    return scripted_server[0]


@pytest.fixture
def script(scripted_server: tuple[Server, ScriptedAnswers]) -> Iterator[ScriptedAnswers]:
    scripted = scripted_server[1]
    yield scripted
    scripted.answers.clear()


def create(client: openai.OpenAI, model: str, **kw: Any) -> Any:
    kw = {"messages": ASK, "tools": [WEATHER, TIME], "temperature": 0, "max_tokens": 80} | kw
    return client.chat.completions.create(model=model, **kw)


def streamed(client: openai.OpenAI, model: str, **kw: Any) -> Any:
    """The streamed answer as the SDK assembles it from the deltas."""
    kw = {"messages": ASK, "tools": [WEATHER, TIME], "temperature": 0, "max_tokens": 80} | kw
    with client.chat.completions.stream(model=model, **kw) as stream:
        for _ in stream:
            pass
        # (get_final_completion would raise on finish_reason "length")
        return stream.current_completion_snapshot


def calls_of(message: Any) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


# ---------------------------------------------------------------- OpenAI


def test_a_call_in_the_answer_is_a_tool_call(served: Server, script: ScriptedAnswers) -> None:
    client = served.client()
    script.answers = [f"Let me look.\n{CALL}"] * 2
    reply = create(client, served.model)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look.\n"
    assert calls_of(choice.message) == [("get_weather", {"city": "Paris"})]
    assert choice.message.tool_calls[0].id.startswith("call_")
    assert choice.message.tool_calls[0].type == "function"
    # The prompt showed the tools (cake's Hermes rendering: SmolLM2's template ignores them).
    prompt = served.master.tokenizer.decode(script.prompts[-1])
    assert "<tools>" in prompt and '"name": "get_time"' in prompt
    assert prompt.endswith("<|im_start|>assistant\n")

    final = streamed(client, served.model).choices[0]
    assert final.finish_reason == "tool_calls"
    assert final.message.content == choice.message.content
    assert calls_of(final.message) == calls_of(choice.message)


def test_the_streamed_deltas_are_openais(served: Server, script: ScriptedAnswers) -> None:
    """Text as content deltas, then the call: index, id, type and name first, then the
    arguments; the last chunk says tool_calls."""
    script.answers = [f"Sure.\n{CALL}"]
    chunks = list(create(served.client(), served.model, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.content or "" for d in deltas) == "Sure.\n"
    tool_deltas = [d.tool_calls[0] for d in deltas if d.tool_calls]
    head, *rest = tool_deltas
    assert (head.index, head.type, head.function.name) == (0, "function", "get_weather")
    assert head.id.startswith("call_") and head.function.arguments == ""
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    assert json.loads("".join(d.function.arguments for d in rest)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_parallel_calls_and_parallel_off(served: Server, script: ScriptedAnswers) -> None:
    two = f'{CALL}\n<tool_call>\n{{"name": "get_time", "arguments": {{}}}}\n</tool_call>'
    script.answers = [two, two]
    both = create(served.client(), served.model).choices[0].message
    assert calls_of(both) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert both.content is None
    one = create(served.client(), served.model, parallel_tool_calls=False).choices[0].message
    assert calls_of(one) == [("get_weather", {"city": "Paris"})]


def test_a_call_of_an_unknown_tool_is_text(served: Server, script: ScriptedAnswers) -> None:
    unknown = CALL.replace("get_weather", "delete_everything")
    script.answers = [unknown, unknown]
    choice = create(served.client(), served.model).choices[0]
    assert (choice.finish_reason, choice.message.content) == ("stop", unknown)
    assert not choice.message.tool_calls
    final = streamed(served.client(), served.model).choices[0]
    assert (final.finish_reason, final.message.content) == ("stop", unknown)


def test_the_history_holds_calls_and_results(served: Server, script: ScriptedAnswers) -> None:
    """An assistant turn of calls (content null) and the tool's result: the model sees both
    (in Hermes tags) and answers."""
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 degrees"},
    ]
    reply = create(served.client(), served.model, messages=history, max_tokens=30)
    assert reply.choices[0].message.content
    prompt = served.master.tokenizer.decode(script.prompts[-1])
    assert CALL in prompt
    assert "<tool_response>\nsunny, 24 degrees\n</tool_response>" in prompt


def test_auto_answers_alike_streamed_or_not(served: Server) -> None:
    """The model's own answer with tools offered (greedy): the streamed deltas, assembled by
    the SDK, give the non-streamed message."""
    client = served.client()
    for kw in ({}, {"tool_choice": "none"}):
        reply = create(client, served.model, max_tokens=24, **kw).choices[0]
        final = streamed(client, served.model, max_tokens=24, **kw).choices[0]
        assert final.finish_reason == reply.finish_reason
        assert final.message.content == reply.message.content
        assert calls_of(final.message) == calls_of(reply.message)


NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize(
    "forced",
    [{"tool_choice": "required", "parallel_tool_calls": False}, {"tool_choice": NAMED}],
    ids=["required", "named"],
)
def test_a_required_call_is_a_valid_call_under_the_grammar(
    served: Server, script: ScriptedAnswers, forced: dict
) -> None:
    """SmolLM2 itself (no script) writes a call of an offered tool, arguments valid under its
    schema, because the grammar allows nothing else; streamed, the same call."""
    client = served.client()
    reply = create(client, served.model, **forced).choices[0]
    assert reply.finish_reason == "tool_calls", reply.message.content
    [(name, arguments)] = calls_of(reply.message)
    assert name == "get_weather" and set(arguments) == {"city"}
    assert isinstance(arguments["city"], str) and arguments["city"]
    assert reply.message.content is None
    final = streamed(client, served.model, **forced).choices[0]
    assert final.finish_reason == "tool_calls"
    assert calls_of(final.message) == calls_of(reply.message)
    assert script.kwargs[-1]["grammar"].kind == "lark"  # the call came under the grammar


def test_a_schema_the_grammar_cannot_take_is_a_400(served: Server) -> None:
    broken = {"type": "object", "properties": {"city": {"$ref": "#/$defs/missing"}}}
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": broken}}
    with pytest.raises(openai.BadRequestError, match="missing") as caught:
        create(served.client(), served.model, tools=[tool], tool_choice="required")
    assert caught.value.body["param"] == "tools"
    assert create(served.client(), served.model, max_tokens=2).usage.completion_tokens >= 1


def test_an_agent_loop_with_the_openai_agents_sdk(served: Server) -> None:
    """OpenAI's Agents SDK against the server: the model must call the Python function (the
    first turn requires a call; the SDK then lets it answer), gets its result, and answers
    with it."""
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)  # nothing leaves the machine
    cities: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        cities.append(city)
        return "sunny, 24 degrees"

    model = OpenAIChatCompletionsModel(model=served.model, openai_client=served.async_client())
    settings = ModelSettings(tool_choice="required", temperature=0, max_tokens=40)
    agent = Agent(
        name="weather",
        instructions="Answer with the tools' results.",
        tools=[get_weather],
        model=model,
        model_settings=settings,
    )
    result = Runner.run_sync(agent, "What is the weather in Paris?", max_turns=3)
    assert cities == ["Paris"]
    assert "sunny, 24 degrees" in result.final_output


HOSTILE = [
    (
        {"tools": [{"type": "function", "function": {"description": "no name"}}]},
        "tools.0.function.name",
    ),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    (
        {
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
            ]
        },
        "tools.0.function.parameters",
    ),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice"),
    (
        {"messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "hi"}]},
        "messages.1",
    ),
    ({"messages": [*ASK, {"role": "tool", "content": "hi"}]}, "messages.1.tool_call_id"),
    ({"messages": [{"role": "assistant", "content": None}]}, "messages.0.content"),
]


@pytest.mark.parametrize(("change", "param"), HOSTILE)
def test_bad_tool_requests_are_400s(served: Server, change: dict, param: str) -> None:
    body = {"model": served.model, "messages": ASK, "tools": [WEATHER], "max_tokens": 4} | change
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    status, answer = post(f"{served.url}/v1/chat/completions", json.dumps(body).encode(), headers)
    assert status == 400, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["type"] == "invalid_request_error"
    assert (answer["error"]["param"] or "").startswith(param), answer
    # The server still serves.
    assert create(served.client(), served.model, max_tokens=2).usage.completion_tokens >= 1


# ---------------------------------------------------------------- Anthropic


def claude(server: Server, api_key: str = API_KEY) -> anthropic.Anthropic:
    """The anthropic SDK, which sends the key as x-api-key."""
    return anthropic.Anthropic(base_url=server.url, api_key=api_key, max_retries=0, timeout=60)


GREEDY = {"extra_body": {"temperature": 0}}  # this SDK no longer names temperature
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_messages_streamed_and_not(served: Server) -> None:
    client = claude(served)
    kw = {"model": served.model, "max_tokens": 24, "messages": FRANCE, **GREEDY}
    message = client.messages.create(system="Be brief.", **kw)
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.model == served.model
    assert message.stop_reason in ("end_turn", "max_tokens")
    [block] = message.content
    assert block.type == "text" and "Paris" in block.text
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    with client.messages.stream(system=[{"type": "text", "text": "Be brief."}], **kw) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == block.text
    assert final.content[0].text == block.text
    assert final.stop_reason == message.stop_reason
    assert final.usage.output_tokens == message.usage.output_tokens
    assert final.usage.input_tokens == message.usage.input_tokens
    count = client.messages.count_tokens(model=served.model, system="Be brief.", messages=FRANCE)
    assert count.input_tokens == message.usage.input_tokens


def test_stop_sequences(served: Server) -> None:
    kw = {"model": served.model, "max_tokens": 24, "messages": FRANCE, **GREEDY}
    message = claude(served).messages.create(stop_sequences=["never", "Paris"], **kw)
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "Paris"
    assert "Paris" not in message.content[0].text
    with claude(served).messages.stream(stop_sequences=["Paris"], **kw) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "Paris")
    assert final.content[0].text == message.content[0].text


ANTHROPIC_WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city",
    "input_schema": WEATHER["function"]["parameters"],
}


def test_a_tool_round_trip(served: Server, script: ScriptedAnswers) -> None:
    """tool_use (scripted), its tool_result, and the model's answer after it, streamed too."""
    client = claude(served)
    script.answers = [f"I will check.\n{CALL}", CALL]
    kw = {"model": served.model, "max_tokens": 60, "tools": [ANTHROPIC_WEATHER], **GREEDY}
    first = client.messages.create(messages=ASK, **kw)
    assert first.stop_reason == "tool_use"
    text, use = first.content
    assert (text.type, text.text) == ("text", "I will check.\n")
    assert (use.type, use.name, use.input) == ("tool_use", "get_weather", {"city": "Paris"})
    assert use.id.startswith("toolu_")
    with client.messages.stream(messages=ASK, **kw) as stream:
        streamed_use = stream.get_final_message()
    assert streamed_use.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in streamed_use.content] == [("get_weather", {"city": "Paris"})]

    result = {"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 24 degrees"}
    history = [
        *ASK,
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": [result]},
    ]
    answer = client.messages.create(messages=history, **kw)
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert answer.content[0].type == "text" and answer.content[0].text
    prompt = served.master.tokenizer.decode(script.prompts[-1])
    assert "<tool_response>\nsunny, 24 degrees\n</tool_response>" in prompt
    assert CALL in prompt


def test_tool_choice_any_is_a_tool_use_under_the_grammar(served: Server) -> None:
    """The model itself (no script): `any` makes its answer one valid tool_use block."""
    choice = {"type": "any", "disable_parallel_tool_use": True}
    kw = {"model": served.model, "max_tokens": 60, "tools": [ANTHROPIC_WEATHER], **GREEDY}
    message = claude(served).messages.create(messages=ASK, tool_choice=choice, **kw)
    assert message.stop_reason == "tool_use"
    [use] = message.content
    assert (use.type, use.name, set(use.input)) == ("tool_use", "get_weather", {"city"})


def anthropic_post(server: Server, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", "x-api-key": API_KEY} | (headers or {})
    return post(f"{server.url}/v1/messages", json.dumps(body).encode(), headers)


@pytest.mark.parametrize(
    ("change", "status", "kind"),
    [
        ({"max_tokens": None}, 400, "invalid_request_error"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            400,
            "invalid_request_error",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            400,
            "invalid_request_error",
        ),
        (
            {
                "messages": [
                    *FRANCE,
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x"}]},
                ]
            },
            400,
            "invalid_request_error",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}],
                    }
                ]
            },
            400,
            "invalid_request_error",
        ),
        ({"tools": [{"name": "f"}]}, 400, "invalid_request_error"),  # no input_schema
        (
            {"tools": [ANTHROPIC_WEATHER], "tool_choice": {"type": "tool", "name": "g"}},
            400,
            "invalid_request_error",
        ),
        ({"model": "claude-opus"}, 404, "not_found_error"),
    ],
)
def test_bad_messages_requests_answer_in_anthropics_shape(
    served: Server, change: dict, status: int, kind: str
) -> None:
    body = {"model": served.model, "max_tokens": 4, "messages": FRANCE} | change
    body = {key: value for key, value in body.items() if value is not None}
    code, answer = anthropic_post(served, body)
    assert code == status, answer
    assert answer["type"] == "error" and answer["error"]["type"] == kind
    assert set(answer["error"]) == {"type", "message"} and answer["error"]["message"]
    assert claude(served).messages.create(model=served.model, max_tokens=2, messages=FRANCE).content


def test_the_key_and_its_errors(served: Server) -> None:
    with pytest.raises(anthropic.AuthenticationError) as caught:
        claude(served, api_key="wrong").messages.create(
            model=served.model, max_tokens=2, messages=FRANCE
        )
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "incorrect API key"},
    }
    code, answer = anthropic_post(
        served, {"model": served.model, "max_tokens": 2, "messages": FRANCE}, {"x-api-key": ""}
    )
    assert code == 401 and answer["error"]["type"] == "authentication_error"
    # The OpenAI routes keep OpenAI's shape.
    with pytest.raises(openai.AuthenticationError) as wrong:
        served.client(api_key="wrong").models.list()
    assert set(wrong.value.body) == {"message", "type", "param", "code"}
