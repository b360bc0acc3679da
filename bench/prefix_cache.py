"""Issue 23's prefix-cache measurement: the second turn of a long conversation, time to the
first token with the prefix cache and without, SmolLM2 (the demo GGUF) over two workers.

    python -m bench.prefix_cache [--doc-tokens 2000] [--rounds 2]

Two worker processes (blocks 0-14 and 15-29, --max-seq-len 4096) serve two masters in this
process, one with the prefix cache and one with --no-prefix-cache. Each round, each master runs
a conversation: turn 1 is a ~`--doc-tokens` document and a question (16 tokens answered), turn 2
the whole conversation plus a new question; the time from the request to its first token is
measured for turn 2. The masters take turns (noisy machines), the fastest round of each counts.
Prints the markdown table (the goal: cached / uncached <= 0.2) and writes
bench/results/prefix_cache.json.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import torch

from bench.machine import cpu_label, machine_info, write_result
from cake.cluster.local_cluster import start_local_cluster
from cake.decoding.sampling import SamplingParams
from cake.decoding.stats import GenerationStats
from cake.master import Master, MasterSettings
from cake.model.demo import demo_gguf
from cake.model.tokenizer import encode_chat

GREEDY = SamplingParams(temperature=0)
CONTEXT = 4096
ANSWER = 16
COLORS = ["red", "green", "blue", "amber", "violet", "grey", "white", "black"]
THINGS = ["river", "bridge", "market", "tower", "garden", "harbour", "library", "station"]


def document(n_tokens: int, round_index: int) -> str:
    """A made-up inventory, about `n_tokens` long (~22 tokens a line), new for each round so
    that no round finds another's conversation in the cache."""
    lines = []
    for i in range(n_tokens // 22):
        color, thing = COLORS[(i * 7 + round_index) % 8], THINGS[(i * 3) % 8]
        lines.append(f"Entry {i}: the {color} {thing} number {i * 37 % 1000} opened in {1900 + i}.")
    return "\n".join(lines)


async def first_token_s(master: Master, prompt: list[int], stats: GenerationStats) -> float:
    started = time.perf_counter()
    tokens = master.generate(prompt, GREEDY, ANSWER, ignore_eos=True, stats=stats)
    await anext(tokens)
    elapsed = time.perf_counter() - started
    async for _ in tokens:
        pass
    return elapsed


async def conversation(master: Master, doc: str) -> dict:
    """Turn 1 (answered), then turn 2's time to its first token."""
    messages = [
        {"role": "system", "content": f"You answer questions about this inventory.\n{doc}"},
        {"role": "user", "content": "Which entry opened first?"},
    ]
    prompt = encode_chat(master.tokenizer, messages)
    answer = [t async for t in master.generate(prompt, GREEDY, ANSWER, ignore_eos=True)]
    messages += [
        {"role": "assistant", "content": master.tokenizer.decode(answer, skip_special_tokens=True)},
        {"role": "user", "content": "And which one is the blue tower?"},
    ]
    second = encode_chat(master.tokenizer, messages)
    stats = GenerationStats()
    seconds = await first_token_s(master, second, stats)
    return {"prompt_tokens": len(second), "cached_tokens": stats.cached_tokens, "ttft_s": seconds}


async def measure(topology: Path, doc_tokens: int, rounds: int) -> dict:
    settings = {"device": "cpu", "max_seq_len": CONTEXT}
    masters = {
        "cached": await Master.open(MasterSettings(demo_gguf(), topology, **settings)),
        "uncached": await Master.open(
            MasterSettings(demo_gguf(), topology, prefix_cache=False, **settings)
        ),
    }
    runs: dict[str, list[dict]] = {name: [] for name in masters}
    try:
        for round_index in range(rounds):
            for name, master in masters.items():
                run = await conversation(master, document(doc_tokens, round_index))
                runs[name].append(run)
                print(f"round {round_index + 1} {name}: {run}", flush=True)
    finally:
        for master in masters.values():
            await master.close()
    best = {name: min(r["ttft_s"] for r in rs) for name, rs in runs.items()}
    return {
        "runs": runs,
        "best_ttft_s": best,
        "ratio": best["cached"] / best["uncached"],
        "prompt_tokens": runs["cached"][0]["prompt_tokens"],
        "cached_tokens": runs["cached"][0]["cached_tokens"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc-tokens", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    info = machine_info(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        topology = Path(tmp) / "topology.yml"
        layers = {"w1": ["model.layers.0-14"], "w2": ["model.layers.15-29"]}
        extra = ("--device", "cpu", "--max-seq-len", str(CONTEXT))
        workers = start_local_cluster(demo_gguf(), layers, topology, extra=extra)
        try:
            result = asyncio.run(measure(topology, args.doc_tokens, args.rounds))
        finally:
            for worker in workers:
                worker.stop()
    best = result["best_ttft_s"]
    print(f"\nCPU: {cpu_label(info)}; SmolLM2-135M Q4_1 GGUF over two workers\n")
    print("| turn 2 prompt | cached | first token, cache | first token, no cache | ratio |")
    print("|---|---|---|---|---|")
    print(
        f"| {result['prompt_tokens']} tokens | {result['cached_tokens']} | "
        f"{best['cached']:.2f} s | {best['uncached']:.2f} s | {result['ratio']:.3f}x |"
    )
    out = write_result("prefix_cache", {"machine": info, **result})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
