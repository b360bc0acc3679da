"""This tree against another commit of cake, in the same run: the figures a change must keep.

    .venv/bin/python -m bench.ab --baseline COMMIT [--rounds 3] [--tokens 128]

Checks COMMIT out into a scratch worktree and runs, for each of the two trees in turn
(alternating which goes first, since these machines are noisy), exactly as users run them:

- **single**: one `cake-cli --prompt` generation on the demo GGUF (the whole model on the
  master): decode tok/s timed from the stdout chunks as they arrive;
- **2 workers**: the same through two worker processes on loopback (blocks split evenly);
- **8 concurrent**: `cake-cli --api` on the demo GGUF and eight greedy streamed chat requests
  at once: generated tokens (the server's usage counts) per second of wall time.

Every run of a tree uses only that tree's code (PYTHONPATH), its workers included; texts must
be identical between the trees. The report gives the median of each figure per tree and the
ratio this tree / baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import openai

from bench.api_throughput import PROMPTS, start_api, worker_layers
from bench.api_throughput import stream as stream_chat
from bench.streamed import stream
from cake.cluster.local_cluster import start_local_cluster
from cake.model.demo import demo_gguf
from cake.model.gguf import resolve_model_path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Tell me a long story about a dragon who learns to read."


def tree_env(tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return {**env, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}


def cli(tree: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "cake.cli", *args]


def single(tree: Path, model: Path, tokens: int, topology: Path | None = None) -> tuple[float, str]:
    args = ["--model", str(model), "--prompt", PROMPT, "-n", str(tokens), "--ignore-eos"]
    args += ["--temperature", "0", "--device", "cpu"]
    if topology is not None:
        args += ["--topology", str(topology)]
    run = stream(cli(tree, *args), tree_env(tree))
    return run.decode_tok_s(tokens), run.text


def two_workers(tree: Path, model: Path, tokens: int, scratch: Path) -> tuple[float, str]:
    folder = resolve_model_path(model)
    topology = scratch / f"topology-{tree.name}.yml"
    workers = start_local_cluster(folder, worker_layers(folder, 2), topology, env=tree_env(tree))
    try:
        return single(tree, model, tokens, topology)
    finally:
        for worker in workers:
            worker.stop()


def concurrent(tree: Path, model: Path, tokens: int, count: int) -> tuple[float, str]:
    prompts = (PROMPTS * (count // len(PROMPTS) + 1))[:count]
    api, url = start_api(resolve_model_path(model), None, env=tree_env(tree))

    async def run() -> tuple[float, str]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)
        async with client:
            name = (await client.models.list()).data[0].id
            await stream_chat(client, name, "warm up", 4)
            started = time.perf_counter()
            results = await asyncio.gather(*(stream_chat(client, name, p, tokens) for p in prompts))
            wall = time.perf_counter() - started
        return sum(n for _, n in results) / wall, "\n".join(text for text, _ in results)

    try:
        return asyncio.run(run())
    finally:
        api.terminate()
        api.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per generation")
    parser.add_argument("--api-tokens", type=int, default=64, help="tokens per API request")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    model = demo_gguf()
    scratch = Path(tempfile.mkdtemp(prefix="cake-ab-"))
    baseline = scratch / "baseline"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline), args.baseline],
        check=True,
        capture_output=True,
    )
    trees = {"baseline": baseline, "this tree": ROOT}
    figures: dict[str, Callable[[Path], tuple[float, str]]] = {
        "single (tok/s)": lambda tree: single(tree, model, args.tokens),
        "2 workers (tok/s)": lambda tree: two_workers(tree, model, args.tokens, scratch),
        f"{args.concurrency} concurrent (tok/s)": lambda tree: concurrent(
            tree, model, args.api_tokens, args.concurrency
        ),
    }
    results: dict[str, dict[str, list[float]]] = {f: {t: [] for t in trees} for f in figures}
    try:
        for round_ in range(args.rounds):
            order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
            for figure, measure in figures.items():
                texts = {}
                for label in order:
                    value, texts[label] = measure(trees[label])
                    results[figure][label].append(value)
                    print(f"round {round_ + 1} {figure} {label}: {value:.1f}", file=sys.stderr)
                if len(set(texts.values())) != 1:
                    sys.exit(f"{figure}: the two trees wrote different texts")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)])
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next(
        (line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?"
    )
    cpus = os.cpu_count()
    print(f"baseline {args.baseline} vs this tree, {args.rounds} rounds, {name}, {cpus} CPUs\n")
    print("| figure | baseline | this tree | ratio |")
    print("|---|---|---|---|")
    for figure, per_tree in results.items():
        base, ours = (
            statistics.median(per_tree["baseline"]),
            statistics.median(per_tree["this tree"]),
        )
        print(f"| {figure} | {base:.1f} | {ours:.1f} | {ours / base:.3f} |")


if __name__ == "__main__":
    main()
