"""Issue 23 end to end: a real `cake-cli --api` process in front of two real worker processes
(the demo model's blocks 0-14 and 15-29), used as agents use it: the openai SDK with tools,
a JSON schema and logprobs, the next turn of the conversation from the prefix cache, and the
anthropic SDK with a tool round trip."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import anthropic
import jsonschema
import openai
import pytest
from api_server import ApiProcess

from cake.cluster.local_cluster import start_local_cluster
from cake.faces.api import model_id

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
CITY = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "population": {"type": "integer", "minimum": 0}},
    "required": ["name", "population"],
}


@pytest.fixture(scope="module")
def server(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    folder = tmp_path_factory.mktemp("agent-cluster")
    topology = folder / "topology.yml"
    layers = {"w1": ["model.layers.0-14"], "w2": ["model.layers.15-29"]}
    workers = start_local_cluster(smollm2_gguf, layers, topology)
    command = [sys.executable, "-m", "cake.cli", "--model", str(smollm2_gguf), "--device", "cpu"]
    api = ApiProcess([*command, "--topology", str(topology), "--api", "127.0.0.1:0"], 180)
    try:
        assert api.url, "the API server did not start:\n" + "".join(api.lines)
        yield api
    finally:
        api.stop()
        for worker in workers:
            worker.stop()


def test_openai_tools_the_cached_next_turn_and_a_schema_with_logprobs(
    server: ApiProcess, smollm2_gguf: Path
) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0)
    name = model_id(smollm2_gguf)
    messages: list = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat.completions.create(
        model=name,
        messages=messages,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,  # a 135M model would go on calling until max_tokens
        temperature=0,
        max_tokens=80,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    # The tool's result and the next turn: the conversation so far comes from the cache.
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"},
    ]
    answer = client.chat.completions.create(
        model=name, messages=messages, tools=[WEATHER], temperature=0, max_tokens=24
    )
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls
    assert answer.usage.prompt_tokens_details.cached_tokens > 20

    city = client.chat.completions.create(
        model=name,
        messages=[{"role": "user", "content": "Name a large city, as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": CITY, "strict": True},
        },
        temperature=0,
        max_tokens=60,
        logprobs=True,
        top_logprobs=2,
    )
    jsonschema.validate(json.loads(city.choices[0].message.content), CITY)
    tokens = city.choices[0].logprobs.content
    assert "".join(t.token for t in tokens) == city.choices[0].message.content
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in tokens)


def test_anthropic_tool_round_trip(server: ApiProcess, smollm2_gguf: Path) -> None:
    client = anthropic.Anthropic(base_url=server.url, api_key="-", max_retries=0)
    tool = {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "input_schema": WEATHER["function"]["parameters"],
    }
    question = {"role": "user", "content": "What is the weather in Rome?"}
    first = client.messages.create(
        model=model_id(smollm2_gguf),
        max_tokens=80,
        messages=[question],
        tools=[tool],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        extra_body={"temperature": 0},  # (this SDK version no longer takes it as an argument)
    )
    assert first.stop_reason == "tool_use"
    (use,) = [block for block in first.content if block.type == "tool_use"]
    jsonschema.validate(use.input, tool["input_schema"])
    second = client.messages.create(
        model=model_id(smollm2_gguf),
        max_tokens=24,
        messages=[
            question,
            {"role": "assistant", "content": [block.model_dump() for block in first.content]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": use.id, "content": "21 degrees"}
                ],
            },
        ],
        tools=[tool],
        extra_body={"temperature": 0},
    )
    assert second.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert second.content and second.usage.input_tokens > first.usage.input_tokens
