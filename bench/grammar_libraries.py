"""llguidance vs xgrammar on the demo tokenizer: what choosing cake's grammar library rested on.

    .venv/bin/pip install xgrammar        # not a dependency of cake; only this script needs it
    .venv/bin/python -m bench.grammar_libraries [--rounds 5]

For each library: the tokenizer object's construction (once per master), the compilation of a
mid-size JSON schema (`SCHEMA`: 3 levels, 16 properties, enums, ranges, patterns, arrays), and
the time of one token's mask along a valid document of that schema (median over its tokens,
the mask computed before each token is consumed, as the sampler does). One thread each.
Prints a markdown table with the CPU name.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from cake.model.demo import demo_gguf
from cake.model.kernels.probe import cpu_model
from cake.model.opener import open_model

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 100000},
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.[a-z]{2,3}$"},
        "active": {"type": "boolean"},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "geo": {
                    "type": "object",
                    "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                    "required": ["lat", "lon"],
                    "additionalProperties": False,
                },
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "manager": {"anyOf": [{"type": "null"}, {"type": "integer"}]},
        "notes": {"type": ["string", "null"]},
    },
    "required": ["id", "name", "email", "active", "role", "tags", "address"],
    "additionalProperties": False,
}
DOCUMENT = {
    "id": 4242,
    "name": "Ada Lovelace",
    "email": "ada@example.org",
    "active": True,
    "score": 0.97,
    "role": "editor",
    "tags": ["math", "engines"],
    "address": {
        "street": "12 St James's Square",
        "city": "London",
        "zip": "12345",
        "geo": {"lat": 51.5, "lon": -0.13},
    },
    "manager": None,
    "notes": "first programmer",
}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def measure_llguidance(tokenizer: Any, vocab: int, text: str) -> tuple[float, float, list[float]]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    build_s, lltok = timed(lambda: llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    compile_s, matcher = timed(lambda: llguidance.LLMatcher(lltok, grammar, log_level=0))
    assert not matcher.is_error(), matcher.get_error()
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)
    masks = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        masks.append(timed(lambda: llguidance.torch.fill_next_token_bitmask(matcher, bitmask))[0])
        assert matcher.consume_token(token), matcher.get_error()
    return build_s, compile_s, masks


def measure_xgrammar(tokenizer: Any, vocab: int, text: str) -> tuple[float, float, list[float]]:
    import xgrammar

    build_s, info = timed(
        lambda: xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    )
    compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    compile_s, compiled = timed(
        lambda: compiler.compile_json_schema(
            json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":")
        )
    )
    matcher = xgrammar.GrammarMatcher(compiled)
    bitmask = xgrammar.allocate_token_bitmask(1, vocab)
    masks = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        masks.append(timed(lambda: matcher.fill_next_token_bitmask(bitmask))[0])
        assert matcher.accept_token(token), f"xgrammar refused token {token}"
    return build_s, compile_s, masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = open_model(demo_gguf())
    tokenizer, vocab = model.tokenizer(), model.config.vocab_size
    text = json.dumps(DOCUMENT, separators=(",", ":"))
    rows = []
    for name, measure in (("llguidance", measure_llguidance), ("xgrammar", measure_xgrammar)):
        builds, compiles, masks = [], [], []
        for _ in range(args.rounds):
            build_s, compile_s, mask_s = measure(tokenizer, vocab, text)
            builds.append(build_s)
            compiles.append(compile_s)
            masks.extend(mask_s)
        rows.append(
            f"| {name} | {statistics.median(builds) * 1e3:.0f} | "
            f"{statistics.median(compiles) * 1e3:.1f} | {statistics.median(masks) * 1e6:.0f} | "
            f"{statistics.quantiles(masks, n=100)[98] * 1e6:.0f} |"
        )
    print(
        f"SmolLM2-135M tokenizer (vocab {vocab}), {cpu_model()}, medians of {args.rounds} rounds\n"
    )
    print("| library | tokenizer object ms | schema compile ms | mask µs/token (median) | p99 µs |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
