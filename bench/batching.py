"""Throughput with many users: aggregate decode tok/s at 1, 2, 4 and 8 concurrent requests.

    .venv/bin/python -m bench.batching [--model smollm2|llama-1b-shape] [--workers 0 2]
                                       [--concurrency 1 2 4 8] [--max-tokens 48]

For each placement (0 workers: the master runs the whole model; 2: two loopback worker
processes) it starts `cake-cli --api` as a process, as users run it, with `--ignore-eos` so
every request generates exactly --max-tokens tokens, and times:

* N streamed greedy requests at once, batched (`--batching`, the default) and, as the old
  baseline, not batched (`--no-batching`: each session walks the pipeline on its own);
* the same N requests one after another (the ratio the issue asks for).

Then transformers' own continuous batching (`generate_batch`) on the same model, in its own
process with its default environment, at the same concurrency levels. Every concurrent text is
checked against its solo text. Writes bench/results/batching.json and a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import openai

from bench.api_throughput import PROMPTS, start_api, stream, worker_layers
from bench.machine import cpu_model
from bench.models import MODEL_KEYS, SMOLLM2, default_cache_dir, resolve_model
from cake.cluster.local_cluster import start_local_cluster

RESULTS = Path(__file__).resolve().parent / "results"


async def _cake_levels(url: str, levels: list[int], n: int) -> dict[str, float]:
    """tok/s at each concurrency level, and N-in-a-row for the largest; texts checked."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=900)
    model = (await client.models.list()).data[0].id
    await stream(client, model, "warm up", 4)
    prompts = (PROMPTS * 4)[: max(levels)]
    results: dict[str, float] = {}
    started = time.perf_counter()
    solo = [await stream(client, model, p, n) for p in prompts]
    results["in a row"] = sum(k for _, k in solo) / (time.perf_counter() - started)
    for level in levels:
        started = time.perf_counter()
        together = await asyncio.gather(*(stream(client, model, p, n) for p in prompts[:level]))
        results[str(level)] = sum(k for _, k in together) / (time.perf_counter() - started)
        if [t for t, _ in together] != [t for t, _ in solo[:level]]:
            raise SystemExit(f"{level} concurrent texts differ from their solo texts")
    await client.close()
    return results


def _cake(
    folder: Path, workers: int, batching: bool, levels: list[int], n: int, groups: int | None
) -> dict:
    scratch = Path("/tmp/cake-batching-bench")
    scratch.mkdir(parents=True, exist_ok=True)
    topology, processes = None, []
    if workers:
        topology = scratch / "topology.yml"
        processes = start_local_cluster(folder, worker_layers(folder, workers), topology)
    api = None
    try:
        flags = ["--ignore-eos", "--batching" if batching else "--no-batching"]
        flags += ["--batch-groups", str(groups)] if groups else []
        api, url = start_api(folder, topology, flags)
        return asyncio.run(_cake_levels(url, levels, n))
    finally:
        if api is not None:
            api.terminate()
            api.wait(30)
        for process in processes:
            process.stop()


_TRANSFORMERS = """
import json, sys, time, torch
from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM
folder, levels, n, dtype = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
prompts = json.loads(sys.argv[5])
model = LlamaForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
       for p in prompts]
ids = [list(x["input_ids"]) if hasattr(x, "keys") else list(x) for x in ids]
config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
model.generate_batch(ids[:2], config)  # warm-up
out = {}
for level in levels:
    started = time.perf_counter()
    result = model.generate_batch(ids[:level], config)
    wall = time.perf_counter() - started
    out[str(level)] = sum(len(r.generated_tokens) for r in result.values()) / wall
print(json.dumps(out))
"""


def _transformers(folder: Path, levels: list[int], n: int, dtype: str) -> dict:
    prompts = (PROMPTS * 4)[: max(levels)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # its defaults
    done = subprocess.run(
        [sys.executable, "-c", _TRANSFORMERS, str(folder), json.dumps(levels), str(n), dtype,
         json.dumps(prompts)],
        capture_output=True, text=True, env=env, timeout=1800,
    )  # fmt: skip
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_chart(rows: dict[str, dict], levels: list[int], title: str, path: Path) -> bool:
    """Aggregate tok/s against concurrent requests, one line per configuration (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no chart: matplotlib is missing (pip install -e '.[bench]')", file=sys.stderr)
        return False
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for name, result in rows.items():
        points = [(n, result[str(n)]) for n in levels if str(n) in result]
        if points:
            style = "--" if "not batched" in name or "transformers" in name else "-"
            axes.plot(*zip(*points, strict=True), style, marker="o", label=name)
    axes.set_xlabel("concurrent requests")
    axes.set_ylabel("aggregate decode tok/s")
    axes.set_xticks(levels)
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODEL_KEYS, default=SMOLLM2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--no-baselines", action="store_true", help="skip --no-batching runs")
    parser.add_argument("--no-transformers", action="store_true", help="skip generate_batch")
    parser.add_argument(
        "--chart-from", type=Path, default=None, help="only redraw the chart from a results JSON"
    )
    parser.add_argument(
        "--batch-groups", type=int, default=None, help="cake's --batch-groups (default: auto)"
    )
    args = parser.parse_args()
    if args.chart_from is not None:
        saved = json.loads(args.chart_from.read_text())
        levels = sorted({int(k) for r in saved.values() for k in r if k.isdigit()})
        title = "SmolLM2-135M f32, 32 tokens per request (AMD EPYC, 2 cores)"
        write_chart(saved, levels, title, args.chart_from.with_suffix(".png"))
        return
    spec = resolve_model(args.model, default_cache_dir())
    levels = sorted(args.concurrency)
    rows: list[tuple[str, dict]] = []
    for workers in args.workers:
        place = "local" if not workers else f"{workers} workers"
        groups = args.batch_groups
        batched = _cake(spec.folder, workers, True, levels, args.max_tokens, groups)
        rows.append(
            (f"cake {place}, batched" + (f", {groups} group(s)" if groups else ""), batched)
        )
        if not args.no_baselines:
            rows.append(
                (
                    f"cake {place}, not batched",
                    _cake(spec.folder, workers, False, levels, args.max_tokens, None),
                )
            )
        print(rows[-1], flush=True)
    torch_dtype = {"f32": "float32", "bf16": "bfloat16"}[spec.dtype]
    if not args.no_transformers:
        baseline = _transformers(spec.folder, levels, args.max_tokens, torch_dtype)
        rows.append(("transformers generate_batch, local", baseline))
    header = (
        "| configuration | "
        + " | ".join(f"{n} at once" for n in levels)
        + f" | {max(levels)} in a row | {max(levels)} at once / in a row |"
    )
    lines = [
        f"{spec.title}, {args.max_tokens} tokens per request, aggregate decode tok/s "
        f"({cpu_model()}, {os.cpu_count()} CPUs)",
        "",
        header,
        "|" + "---|" * (len(levels) + 3),
    ]
    for name, result in rows:
        if "error" in result:
            lines.append(f"| {name} | {result['error']} |")
            continue
        cells = [f"{result.get(str(n), float('nan')):.1f}" for n in levels]
        in_row = result.get("in a row")
        ratio = f"{result[str(max(levels))] / in_row:.2f}x" if in_row else "—"
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {in_row:.1f} | {ratio} |"
            if in_row
            else f"| {name} | " + " | ".join(cells) + " | — | — |"
        )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"batching-{args.model}.json").write_text(json.dumps(dict(rows), indent=2))
    (RESULTS / f"batching-{args.model}.md").write_text(table + "\n")
    write_chart(dict(rows), levels, lines[0], RESULTS / f"batching-{args.model}.png")


if __name__ == "__main__":
    main()
