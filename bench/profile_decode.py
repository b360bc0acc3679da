"""Where a decode step's time goes: torch.profiler over cake local and transformers.

    .venv/bin/python -m bench.profile_decode [--model smollm2|llama-1b-shape] [--steps 16]

Prefills a prompt of random token ids (untimed), then profiles `--steps` greedy decode steps of
each and prints the operators with the most self CPU time, and the total per step.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from bench.models import MODEL_KEYS, SMOLLM2, default_cache_dir, resolve_model
from bench.runs import CakeRunner, Runner, TransformersRunner
from bench.throughput import RunSettings, random_prompt


async def profile_runner(runner: Runner, prompt: list[int], steps: int, rows: int) -> None:
    await runner.run(prompt, 2)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        measured = await runner.run(prompt[:1], steps)  # a 1-token prompt: (almost) only decode
    print(f"\n## {runner.label}: {measured.decode_tok_s:.1f} tok/s over {steps} steps\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


async def main_async(options: argparse.Namespace) -> None:
    spec = resolve_model(options.model, default_cache_dir())
    settings = RunSettings(rounds=1, tokens=options.steps, prompt_tokens=64, threads=1)
    prompt = random_prompt(spec, settings)
    runners: list[Runner] = [TransformersRunner(spec), await CakeRunner.local(spec, 256)]
    try:
        for runner in runners:
            await profile_runner(runner, prompt, options.steps, options.rows)
    finally:
        for runner in runners:
            await runner.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=SMOLLM2, choices=MODEL_KEYS)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    print(f"# decode profile, {options.model}, {options.threads} threads", file=sys.stderr)
    asyncio.run(main_async(options))


if __name__ == "__main__":
    main()
