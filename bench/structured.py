"""Structured output's cost: tokens/s of 8 concurrent requests with a JSON schema vs without.

    .venv/bin/python -m bench.structured [--concurrency 8] [--max-tokens 96] [--rounds 3]

Starts `cake-cli --model <demo> --api 127.0.0.1:0 --ignore-eos` as a process (the demo model,
SmolLM2-135M as Q4_1 GGUF, on the master alone). Each round sends `--concurrency` greedy
streamed chat requests at once without a response_format, then the same with a JSON schema
(alternating, because these machines are noisy). Both run exactly `--max-tokens` tokens per
request: --ignore-eos for the free text, and a schema whose list needs more items than fit for
the constrained ones, so both have the same rows in every step. Prints a markdown table with
the CPU name and the ratio (goal: >= 0.9x).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import openai

from bench.api_throughput import PROMPTS, default_model, start_api
from cake.model.kernels.probe import cpu_model

SCHEMA = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": 50,  # more than fit in --max-tokens: every request runs to the end
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 20},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "city": {"enum": ["Paris", "London", "Berlin", "Rome"]},
                },
                "required": ["name", "age", "city"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["people"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "people", "schema": SCHEMA}}


async def one(client: openai.AsyncOpenAI, model: str, prompt: str, n: int, schema: bool) -> int:
    extra = {"response_format": FORMAT} if schema else {}
    chunks = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"{prompt} Then list people as JSON."}],
        temperature=0,
        max_tokens=n,
        stream=True,
        stream_options={"include_usage": True},
        **extra,
    )
    tokens = 0
    async for chunk in chunks:
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return tokens


async def at_once(
    client: openai.AsyncOpenAI, model: str, prompts: list[str], n: int, schema: bool
) -> float:
    started = time.perf_counter()
    tokens = await asyncio.gather(*(one(client, model, p, n, schema) for p in prompts))
    if set(tokens) != {n}:
        raise SystemExit(f"expected {n} tokens per request, got {tokens}")
    return sum(tokens) / (time.perf_counter() - started)


async def measure(
    url: str, prompts: list[str], n: int, rounds: int
) -> tuple[list[float], list[float]]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    await at_once(client, model, prompts[:2], 4, schema=True)  # compiles the schema once
    free, constrained = [], []
    for _ in range(rounds):
        free.append(await at_once(client, model, prompts, n, schema=False))
        constrained.append(await at_once(client, model, prompts, n, schema=True))
    return free, constrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    prompts = (PROMPTS * (args.concurrency // len(PROMPTS) + 1))[: args.concurrency]
    api, url = start_api(default_model(), None, ["--ignore-eos"])
    try:
        free, constrained = asyncio.run(measure(url, prompts, args.max_tokens, args.rounds))
    finally:
        api.terminate()
        api.wait(30)
    best_free, best_constrained = max(free), max(constrained)
    print(f"SmolLM2-135M (Q4_1 GGUF), master alone, {cpu_model()}; {args.concurrency} concurrent")
    print(f"streamed greedy requests of {args.max_tokens} tokens, best of {args.rounds} rounds\n")
    print("| requests | tokens/s | vs free text |")
    print("|---|---|---|")
    print(f"| free text | {best_free:.1f} | 1.00x |")
    print(f"| JSON schema | {best_constrained:.1f} | {best_constrained / best_free:.2f}x |")


if __name__ == "__main__":
    main()
