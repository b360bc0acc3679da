"""Structured output and logprobs through the API, with the real SmolLM2 model and the official
`openai` client: every JSON-schema answer validates against its schema (the `jsonschema`
package), bad response formats are 400s that leave the server serving, and the reported
logprobs are the log_softmax of the master's own logits for the same tokens."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
import torch
from api_server import GenerationLog, Server, api_in_thread

pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}

# (what to ask for, its schema): nested objects, arrays with min/max items, enums, numbers with
# ranges, integers, booleans, required and optional fields, nullable, strings with patterns and
# lengths, anyOf, $defs, const.
SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("a person", PERSON),
    (
        "a city",
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    ),
    (
        "a colour",
        {
            "type": "object",
            "properties": {"colour": {"enum": ["red", "green", "blue"]}},
            "required": ["colour"],
        },
    ),
    (
        "a temperature in Celsius",
        {
            "type": "object",
            "properties": {"celsius": {"type": "number", "minimum": -50, "maximum": 60}},
            "required": ["celsius"],
        },
    ),
    (
        "whether the sky is blue",
        {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"]},
    ),
    (
        "three fruits",
        {
            "type": "object",
            "properties": {
                "fruits": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 20},
                    "minItems": 3,
                    "maxItems": 3,
                }
            },
            "required": ["fruits"],
        },
    ),
    (
        "one to four prime numbers",
        {
            "type": "object",
            "properties": {
                "primes": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 2, "maximum": 100},
                    "minItems": 1,
                    "maxItems": 4,
                }
            },
            "required": ["primes"],
            "additionalProperties": False,
        },
    ),
    (
        "a book with its author",
        {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 60},
                "author": {
                    "type": "object",
                    "properties": {
                        "first": {"type": "string", "maxLength": 20},
                        "last": {"type": "string", "maxLength": 20},
                    },
                    "required": ["first", "last"],
                    "additionalProperties": False,
                },
                "year": {"type": "integer", "minimum": 1400, "maximum": 2030},
            },
            "required": ["title", "author", "year"],
            "additionalProperties": False,
        },
    ),
    (
        "a US zip code",
        {
            "type": "object",
            "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["zip"],
        },
    ),
    (
        "an email address",
        {
            "type": "object",
            "properties": {
                "email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.(com|org)$"}
            },
            "required": ["email"],
            "additionalProperties": False,
        },
    ),
    (
        "a short nickname",
        {
            "type": "object",
            "properties": {"nickname": {"type": "string", "minLength": 3, "maxLength": 8}},
            "required": ["nickname"],
        },
    ),
    (
        "a person whose middle name may be unknown",
        {
            "type": "object",
            "properties": {
                "first": {"type": "string", "maxLength": 20},
                "middle": {"type": ["string", "null"], "maxLength": 20},
            },
            "required": ["first", "middle"],
            "additionalProperties": False,
        },
    ),
    (
        "an id that is a number or a code",
        {
            "type": "object",
            "properties": {
                "id": {
                    "anyOf": [
                        {"type": "integer", "minimum": 0},
                        {"type": "string", "pattern": "^[A-Z]{3}$"},
                    ]
                }
            },
            "required": ["id"],
        },
    ),
    (
        "a product with an optional discount",
        {
            "type": "object",
            "properties": {
                "product": {"type": "string", "maxLength": 30},
                "price": {"type": "number", "minimum": 0, "maximum": 10000},
                "discount": {"type": "number", "minimum": 0, "maximum": 1},
            },
            "required": ["product", "price"],
            "additionalProperties": False,
        },
    ),
    (
        "a point in 2D",
        {
            "type": "object",
            "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
            "required": ["x", "y"],
            "additionalProperties": False,
        },
    ),
    (
        "a list of two people",
        {
            "type": "object",
            "properties": {
                "people": {"type": "array", "items": PERSON, "minItems": 2, "maxItems": 2}
            },
            "required": ["people"],
            "additionalProperties": False,
        },
    ),
    (
        "a weekday",
        {
            "type": "object",
            "properties": {"day": {"enum": ["Mon", "Tue", "Wed", "Thu", "Fri"]}},
            "required": ["day"],
        },
    ),
    (
        "a rating from 1 to 5",
        {
            "type": "object",
            "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5}},
            "required": ["stars"],
        },
    ),
    (
        "a shape",
        {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "kind": {"const": "circle"},
                        "radius": {"type": "number", "minimum": 0},
                    },
                    "required": ["kind", "radius"],
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "properties": {
                        "kind": {"const": "square"},
                        "side": {"type": "number", "minimum": 0},
                    },
                    "required": ["kind", "side"],
                    "additionalProperties": False,
                },
            ]
        },
    ),
    (
        "a company with its address",
        {
            "type": "object",
            "properties": {
                "company": {"type": "string", "maxLength": 30},
                "address": {
                    "type": "object",
                    "properties": {
                        "street": {"type": "string", "maxLength": 40},
                        "city": {"type": "string", "maxLength": 20},
                        "country": {"enum": ["FR", "DE", "US", "UK"]},
                    },
                    "required": ["street", "city", "country"],
                    "additionalProperties": False,
                },
                "public": {"type": "boolean"},
            },
            "required": ["company", "address", "public"],
            "additionalProperties": False,
        },
    ),
    (
        "a to-do list",
        {
            "type": "object",
            "properties": {
                "todos": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "task": {"type": "string", "maxLength": 30},
                            "done": {"type": "boolean"},
                        },
                        "required": ["task", "done"],
                        "additionalProperties": False,
                    },
                    "minItems": 1,
                    "maxItems": 3,
                }
            },
            "required": ["todos"],
            "additionalProperties": False,
        },
    ),
    (
        "a matrix of small integers",
        {
            "type": "object",
            "properties": {
                "rows": {
                    "type": "array",
                    "items": {
                        "type": "array",
                        "items": {"type": "integer", "minimum": 0, "maximum": 9},
                        "minItems": 2,
                        "maxItems": 2,
                    },
                    "minItems": 2,
                    "maxItems": 2,
                }
            },
            "required": ["rows"],
        },
    ),
    (
        "a person from $defs",
        {
            "$defs": {"person": PERSON},
            "type": "object",
            "properties": {"who": {"$ref": "#/$defs/person"}},
            "required": ["who"],
        },
    ),
    (
        "a yes or no answer with a reason",
        {
            "type": "object",
            "properties": {
                "answer": {"enum": ["yes", "no"]},
                "reason": {"type": "string", "maxLength": 60},
            },
            "required": ["answer", "reason"],
            "additionalProperties": False,
        },
    ),
    (
        "a version number",
        {
            "type": "object",
            "properties": {
                "version": {
                    "type": "string",
                    "pattern": "^[0-9]+\\.[0-9]+\\.[0-9]+$",
                    "maxLength": 12,
                }
            },
            "required": ["version"],
        },
    ),
    (
        "a probability",
        {
            "type": "object",
            "properties": {"p": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}},
            "required": ["p"],
        },
    ),
    (
        "two to four tags",
        {
            "type": "object",
            "properties": {
                "tags": {
                    "type": "array",
                    "items": {"enum": ["a", "b", "c"]},
                    "minItems": 2,
                    "maxItems": 4,
                }
            },
            "required": ["tags"],
        },
    ),
    (
        "a list of numbers",
        {
            "type": "array",
            "items": {"type": "integer", "minimum": -5, "maximum": 5},
            "minItems": 1,
            "maxItems": 5,
        },
    ),
    (
        "a movie with optional rating that may be null",
        {
            "type": "object",
            "properties": {
                "movie": {"type": "string", "maxLength": 40},
                "rating": {
                    "anyOf": [{"type": "number", "minimum": 0, "maximum": 10}, {"type": "null"}]
                },
            },
            "required": ["movie", "rating"],
            "additionalProperties": False,
        },
    ),
    (
        "a country and its capital",
        {
            "type": "object",
            "properties": {
                "country": {"type": "string", "maxLength": 30},
                "capital": {"type": "string", "maxLength": 30},
            },
            "required": ["country", "capital"],
            "additionalProperties": False,
        },
    ),
]


@pytest.fixture(scope="module")
def smol(smollm2_gguf: Path) -> Iterator[tuple[Server, GenerationLog]]:
    """SmolLM2 (the demo GGUF) behind the API; the log holds each generation's token ids.
    No prefix cache: the logprobs tests recompute each request's positions in its own steps
    (a cached prefix was computed in another request's, which the quantized kernels round
    differently by ~1e-3)."""
    box: dict[str, GenerationLog] = {}
    with api_in_thread(
        smollm2_gguf,
        prepare=lambda m: box.setdefault("log", GenerationLog(m)),
        master_options={"prefix_cache": False},
    ) as server:
        yield server, box["log"]


def ask(server: Server, what: str, schema: dict[str, Any], **options: Any) -> Any:
    return server.client().chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": f"Give me {what}, as JSON."}],
        max_tokens=200,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema, "strict": True},
        },
        **options,
    )


def test_every_json_schema_answer_validates(smol: tuple[Server, GenerationLog]) -> None:
    """Greedy, then sampled with a seed, eight requests at a time (each a row of shared steps)."""
    server, _ = smol
    cases = [(what, schema, {"temperature": 0}) for what, schema in SCHEMAS]
    cases += [
        (what, schema, {"temperature": 0.8, "seed": i})
        for i, (what, schema) in enumerate(SCHEMAS[:10])
    ]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda case: ask(server, case[0], case[1], **case[2]), cases))
    for (what, schema, _), reply in zip(cases, replies, strict=True):
        text = reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop", (what, text)
        jsonschema.validate(json.loads(text), schema)


def test_a_streamed_json_schema_answer_equals_the_whole(smol: tuple[Server, GenerationLog]) -> None:
    server, _ = smol
    whole = ask(server, "a book with its author", SCHEMAS[7][1], temperature=0)
    chunks = ask(server, "a book with its author", SCHEMAS[7][1], temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        whole.choices[0].message.content
    )


def test_json_object_gives_a_json_object(smol: tuple[Server, GenerationLog]) -> None:
    server, _ = smol
    client = server.client()
    reply = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Give me a person with a name and an age, as JSON."}],
        max_tokens=120,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    completion = client.completions.create(
        model=server.model,
        prompt='A person as JSON: {"name": "Ann", "age": 31}\nAnother person as JSON:',
        max_tokens=120,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert isinstance(json.loads(completion.choices[0].text), dict)
    text = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=5,
        temperature=0,
        response_format={"type": "text"},
    )
    assert text.choices[0].message.content


def recursive_schema() -> dict[str, Any]:
    node = {"type": "object", "properties": {"child": {"$ref": "#/$defs/node"}}}
    return {"$defs": {"node": node}, "$ref": "#/$defs/node"}


def deep_schema(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


HUGE = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(5000)}}


@pytest.mark.parametrize(
    ("response_format", "says"),
    [
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
            "Invalid type",
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"not": {"type": "null"}}},
            },
            "not",
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
            },
            "uniqueItems",
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "format": "nope"}},
            },
            "format",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": recursive_schema()}},
            "recursive",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": deep_schema(40)}},
            "deeper than",
        ),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": HUGE}}, "characters"),
        ({"type": "json_schema"}, "needs a json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, "name"),
        ({"type": "xml"}, "type"),
        ("json", "response_format"),
    ],
)
def test_bad_response_formats_are_400s_and_the_server_goes_on(
    smol: tuple[Server, GenerationLog], response_format: Any, says: str
) -> None:
    server, _ = smol
    client = server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            response_format=response_format,
        )
    error = caught.value.body
    assert caught.value.status_code == 400
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert (error["param"] or "").startswith("response_format")
    assert says in error["message"]
    reply = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert reply.choices[0].message.content


@pytest.mark.parametrize(
    ("endpoint", "options", "param"),
    [
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("chat", {"top_logprobs": 2}, "top_logprobs"),
        ("completions", {"logprobs": 6}, "logprobs"),
        ("completions", {"logprobs": -1}, "logprobs"),
    ],
)
def test_logprobs_out_of_range_are_400s(
    smol: tuple[Server, GenerationLog], endpoint: str, options: dict[str, Any], param: str
) -> None:
    server, _ = smol
    client = server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        if endpoint == "chat":
            client.chat.completions.create(
                model=server.model,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=2,
                **options,
            )
        else:
            client.completions.create(model=server.model, prompt="hi", max_tokens=2, **options)
    assert caught.value.body["param"] == param


def reference_logprobs(server: Server, prompt_ids: list[int], new_ids: list[int]) -> torch.Tensor:
    """log_softmax of the master's own logits at each new token's position (new tokens, vocab):
    the prompt's forward, then one forward per token, as a generation steps (the demo model's
    quantized kernels for one position and for many round differently, by ~1e-3)."""

    async def forward() -> list[torch.Tensor]:
        session = server.master.scheduler.open_session()
        try:
            rows = [await session.forward(prompt_ids, 0)]
            for position, token in enumerate(new_ids[:-1], start=len(prompt_ids)):
                rows.append(await session.forward([token], position))
            return rows
        finally:
            await session.close()

    return torch.log_softmax(torch.stack(server.on_loop(forward())).float(), dim=-1)


def check(
    reported: list[float], tops: list[list[float]], expected: torch.Tensor, ids: list[int]
) -> None:
    """The chosen tokens' and the top alternatives' logprobs equal the reference's."""
    assert len(reported) == len(ids) > 0
    torch.testing.assert_close(
        torch.tensor(reported), expected[range(len(ids)), ids], atol=1e-4, rtol=0
    )
    for row, top in zip(expected, tops, strict=True):
        torch.testing.assert_close(
            torch.tensor(top), torch.topk(row, len(top)).values, atol=1e-4, rtol=0
        )


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_are_the_models_log_softmax(
    smol: tuple[Server, GenerationLog], stream: bool
) -> None:
    server, log = smol
    messages = [{"role": "user", "content": "Name a colour."}]
    reply = server.client().chat.completions.create(
        model=server.model,
        messages=messages,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        stream=stream,
    )
    if stream:
        content = [
            entry
            for chunk in reply
            if chunk.choices and chunk.choices[0].logprobs
            for entry in chunk.choices[0].logprobs.content
        ]
    else:
        content = reply.choices[0].logprobs.content
        assert "".join(e.token for e in content) == reply.choices[0].message.content
    ids = [record.token for record in log.stats[-1].logprobs]
    prompt_ids = server.on_loop(server.service.encode_chat(messages))
    expected = reference_logprobs(server, prompt_ids, ids)
    check(
        [e.logprob for e in content],
        [[t.logprob for t in e.top_logprobs] for e in content],
        expected,
        ids,
    )
    assert all(len(e.top_logprobs) == 3 and bytes(e.bytes).decode() == e.token for e in content)


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_are_the_models_log_softmax(
    smol: tuple[Server, GenerationLog], stream: bool
) -> None:
    server, log = smol
    prompt = "The capital of France is"
    reply = server.client().completions.create(
        model=server.model, prompt=prompt, max_tokens=10, temperature=0, logprobs=2, stream=stream
    )
    choices = [chunk.choices[0] for chunk in reply] if stream else reply.choices
    text = "".join(c.text for c in choices)
    lp = [c.logprobs for c in choices if c.logprobs]
    tokens = [t for p in lp for t in p.tokens]
    offsets = [o for p in lp for o in p.text_offset]
    assert "".join(tokens) == text
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    ids = [record.token for record in log.stats[-1].logprobs]
    prompt_ids = server.on_loop(server.service.encode_completion(prompt))
    expected = reference_logprobs(server, prompt_ids, ids)
    tops = [sorted(d.values(), reverse=True) for p in lp for d in p.top_logprobs]
    check([x for p in lp for x in p.token_logprobs], tops, expected, ids)


def test_a_grammar_with_logprobs_reports_the_unconstrained_distribution(
    smol: tuple[Server, GenerationLog],
) -> None:
    """Logprobs are the model's own, before the grammar's mask: the top alternatives may lie
    outside the grammar, and the chosen token's logprob is its raw one."""
    server, log = smol
    messages = [{"role": "user", "content": "Give me a person, as JSON."}]
    reply = server.client().chat.completions.create(
        model=server.model,
        messages=messages,
        max_tokens=60,
        temperature=0,
        logprobs=True,
        top_logprobs=1,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    ids = [record.token for record in log.stats[-1].logprobs]
    prompt_ids = server.on_loop(server.service.encode_chat(messages))
    content = reply.choices[0].logprobs.content
    expected = reference_logprobs(server, prompt_ids, ids)
    check(
        [e.logprob for e in content],
        [[t.logprob for t in e.top_logprobs] for e in content],
        expected,
        ids,
    )


def test_constrained_and_logprobs_requests_decode_without_drafts(
    smol: tuple[Server, GenerationLog],
) -> None:
    """cake_draft is ignored where a grammar or logprobs are asked: one token per step, the
    same text as without drafting; a plain request with the same cake_draft does draft."""
    server, log = smol
    schema = SCHEMAS[7][1]
    plain = ask(server, "a book with its author", schema, temperature=0)
    drafted = ask(
        server, "a book with its author", schema, temperature=0, extra_body={"cake_draft": "lookup"}
    )
    assert log.stats[-1].drafted == 0
    assert log.stats[-1].decode_steps == log.stats[-1].decode_tokens
    assert drafted.choices[0].message.content == plain.choices[0].message.content
    client = server.client()
    messages = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    client.chat.completions.create(
        model=server.model,
        messages=messages,
        max_tokens=40,
        temperature=0,
        logprobs=True,
        extra_body={"cake_draft": "lookup"},
    )
    assert log.stats[-1].drafted == 0
    client.chat.completions.create(
        model=server.model,
        messages=messages,
        max_tokens=40,
        temperature=0,
        extra_body={"cake_draft": "lookup"},
    )
    assert log.stats[-1].drafted > 0  # lookup drafting does draft here: the checks above can fail
