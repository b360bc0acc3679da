"""Grammar-constrained sampling (cake/decoding/grammar.py) and logprobs, without a model: the
demo model's real tokenizer and seeded random logits. The API's tests run the real model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from cake.decoding.grammar import (
    MAX_GRAMMAR_CHARS,
    GrammarError,
    GrammarMatcher,
    GrammarSpec,
    check_grammar,
)
from cake.decoding.logprobs import token_logprobs
from cake.decoding.sampling import Sampler, SamplingParams
from cake.model.opener import open_model

SCHEMA = {
    "type": "object",
    "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "kind": {"enum": ["cat", "dog"]},
        "ok": {"type": "boolean"},
        "tag": {"type": "string", "maxLength": 4},
        "list": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2},
        "maybe": {"type": ["number", "null"]},
    },
    "required": ["n", "kind", "ok", "tag", "list"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf: Path) -> Any:
    return open_model(smollm2_gguf).tokenizer()


def walk(
    tokenizer: Any, spec: GrammarSpec, params: SamplingParams, seed: int, stop: int = 2
) -> tuple[str, GrammarMatcher]:
    """Draw under the grammar from seeded random logits until it is complete (or a stop)."""
    matcher = GrammarMatcher.start(spec, tokenizer, {stop})
    sampler, noise = Sampler(params), torch.Generator().manual_seed(seed)
    tokens: list[int] = []
    for _ in range(200):
        token = sampler(matcher.constrain(torch.randn(49152, generator=noise) * 3), tokens)
        if token == stop or matcher.done:
            break
        matcher.advance(token)
        tokens.append(token)
        if matcher.done:
            break
    return tokenizer.decode(tokens), matcher


def test_random_logits_under_a_schema_give_valid_documents(tokenizer: Any) -> None:
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    for seed in range(2):
        text, matcher = walk(tokenizer, spec, SamplingParams(temperature=1.0, seed=seed), seed)
        assert matcher.done, text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_top_k_one_is_greedy_inside_the_grammar(tokenizer: Any) -> None:
    """The mask comes before top-k: top-k 1 keeps the best *allowed* token, as greedy does."""
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    greedy, _ = walk(tokenizer, spec, SamplingParams(temperature=0), seed=7)
    top1, _ = walk(tokenizer, spec, SamplingParams(temperature=1.5, top_k=1, seed=1), seed=7)
    assert greedy == top1
    jsonschema.validate(json.loads(greedy), SCHEMA)


def test_stop_tokens_are_allowed_only_where_the_grammar_may_end(tokenizer: Any) -> None:
    matcher = GrammarMatcher.start(GrammarSpec("lark", 'start: "a"+'), tokenizer, {2, 7})
    logits = torch.zeros(49152)
    assert torch.isinf(matcher.constrain(logits)[[2, 7]]).all()  # nothing written yet
    matcher.advance(tokenizer.convert_tokens_to_ids("a"))
    assert torch.isfinite(matcher.constrain(logits)[[2, 7]]).all()
    assert not matcher.done  # more a's may follow


def test_a_spec_is_compiled_once(tokenizer: Any) -> None:
    from cake.decoding.grammar import _compiler_for

    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    check_grammar(spec, tokenizer)
    compiler = _compiler_for(tokenizer)
    assert compiler.compiled(spec) is compiler.compiled(GrammarSpec("json_schema", spec.source))


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


RECURSIVE = {
    "type": "object",
    "properties": {"child": {"$ref": "#/$defs/node"}},
    "$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}}},
}
HUGE = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(3000)}}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (GrammarSpec("json_schema", "{not json"), "not valid JSON"),
        (GrammarSpec("json_schema", "[1, 2]"), "is an object"),
        (GrammarSpec("json_schema", '{"type": "strin"}'), "Invalid type"),
        (GrammarSpec("json_schema", '{"not": {"type": "string"}}'), "not"),
        (GrammarSpec("json_schema", json.dumps(RECURSIVE)), "recursive"),
        (GrammarSpec("json_schema", json.dumps({"$ref": "#"})), "recursive"),
        (GrammarSpec("json_schema", json.dumps(nested(40))), "nests deeper than 64 levels"),
        (GrammarSpec("json_schema", "[" * 5000 + "]" * 5000), "nests deeper than 64"),
        (GrammarSpec("json_schema", json.dumps(HUGE)), f"than the {MAX_GRAMMAR_CHARS}"),
        (GrammarSpec("lark", "start: undefined_rule"), "unknown name"),
    ],
)
def test_bad_specs_are_grammar_errors_that_say_why(
    tokenizer: Any, spec: GrammarSpec, message: str
) -> None:
    with pytest.raises(GrammarError, match=message):
        check_grammar(spec, tokenizer)


def test_a_schema_within_the_limits_compiles(tokenizer: Any) -> None:
    check_grammar(GrammarSpec("json_schema", json.dumps(nested(20))), tokenizer)


def test_logprobs_are_the_log_softmax_of_the_raw_logits() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    expected = torch.log_softmax(logits, dim=-1)
    record = token_logprobs(logits, 17, top=5)
    assert record.token == 17
    assert record.logprob == pytest.approx(float(expected[17]))
    best = torch.topk(expected, 5)
    assert [t for t, _ in record.top] == best.indices.tolist()
    assert [lp for _, lp in record.top] == pytest.approx(best.values.tolist())
    assert token_logprobs(logits, 3, top=0).top == ()
    with pytest.raises(ValueError, match=r"0\.\.20"):
        token_logprobs(logits, 3, top=21)


def test_strict_closes_the_objects_that_say_nothing() -> None:
    """response_format's strict: true, as OpenAI's: an object without additionalProperties
    has exactly its properties; one that says, and allOf's parts, are left as they are."""
    from cake.faces.api.schemas import closed_objects

    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"properties": {"type": "string"}}},
            "b": {"anyOf": [{"type": "object"}, {"type": "null"}]},
            "c": {"type": "array", "items": {"properties": {"x": {}}}},
        },
        "additionalProperties": True,
        "allOf": [{"type": "object"}],
        "$defs": {"d": {"type": "object"}},
    }
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is True
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["a"]["properties"] == {"properties": {"type": "string"}}
    assert closed["properties"]["b"]["anyOf"] == [
        {"type": "object", "additionalProperties": False},
        {"type": "null"},
    ]
    assert closed["properties"]["c"]["items"]["additionalProperties"] is False
    assert closed["allOf"] == [{"type": "object"}]
    assert closed["$defs"]["d"]["additionalProperties"] is False
    assert "additionalProperties" not in schema["properties"]["a"]  # a copy was changed


@pytest.mark.slow  # reading Llama 3's tokenizer and building llguidance's for it: ~3 s
def test_a_hugging_face_folders_tokenizer_works_as_the_ggufs(llama3_tokenizer_dir: Path) -> None:
    """The demo GGUF's tokenizer above; here the real Llama 3.2 tokenizer of a model folder."""
    from cake.decoding.grammar import token_bytes
    from cake.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(llama3_tokenizer_dir)
    eos = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    matcher = GrammarMatcher.start(GrammarSpec("json_schema", json.dumps(SCHEMA)), tokenizer, {eos})
    document = {"n": 7, "kind": "dog", "ok": True, "tag": "ab", "list": [1, 2], "maybe": None}
    ids = tokenizer.encode(json.dumps(document), add_special_tokens=False)
    assert b"".join(token_bytes(tokenizer, t) for t in ids).decode() == json.dumps(document)
    logits = torch.zeros(128256)
    for token in ids:
        allowed = matcher.constrain(logits)
        assert torch.isfinite(allowed[token]) and torch.isinf(allowed[eos])
        matcher.advance(token)
    assert matcher.done
