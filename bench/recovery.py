"""Issue 24's recovery measurement: a worker killed mid-generation and restarted, how long the
generation stalls, against that worker's own warm start.

    python -m bench.recovery [--model FILE.gguf] [--tokens 24] [--kill-after 8]

Two worker processes split the model's blocks in halves (the default model: the demo GGUF; the
issue's: `--model ~/.cache/cake/bench/llama-3-8b-shape-q4_0.gguf`, 16 blocks each). First the
second worker's warm start is timed alone (process start to its "serving" line; its packed
weights are in the cache from the cluster's first start). Then a master generates `--tokens`
greedy tokens and, after `--kill-after`, the second worker is killed (SIGKILL, as a crash) and
started again on its port; the stall is the longest pause between two tokens. Prints the table
(goal: stall <= 1.5x the warm start) and writes bench/results/recovery.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.machine import cpu_label, machine_info
from cake.cluster.local_cluster import WorkerProcess, start_local_cluster, worker_command
from cake.decoding.sampling import SamplingParams
from cake.master import Master, MasterSettings
from cake.model.config import LlamaConfig
from cake.model.demo import demo_gguf
from cake.model.opener import open_model

RESULTS = Path(__file__).resolve().parent / "results"
GREEDY = SamplingParams(temperature=0)
EXTRA = ("--device", "cpu", "--max-seq-len", "512")


def restart(model: Path, topology: Path, worker: WorkerProcess) -> tuple[WorkerProcess, float]:
    """The worker started again on its port; seconds until it serves."""
    address = f"127.0.0.1:{worker.port}"
    started = time.perf_counter()
    process = WorkerProcess(
        worker.name, worker_command(model, worker.name, topology, address, EXTRA)
    )
    process.wait_ready(600)
    return process, time.perf_counter() - started


async def generate(
    model: Path, topology: Path, workers: dict[str, WorkerProcess], tokens: int, kill_after: int
) -> tuple[list[float], float]:
    """Token arrival times (seconds from the first), and the victim's restart time."""
    master = await Master.open(
        MasterSettings(model, topology, device="cpu", max_seq_len=512, retry_timeout=600)
    )
    arrivals: list[float] = []
    restarted: dict[str, float] = {}

    def crash_and_restart() -> None:
        workers["w2"].kill()
        workers["w2"], restarted["s"] = restart(model, topology, workers["w2"])

    thread = threading.Thread(target=crash_and_restart)
    try:
        prompt = master.encode("Tell me about the history of the bridges of Paris.")
        async for _ in master.generate(prompt, GREEDY, tokens, ignore_eos=True):
            arrivals.append(time.perf_counter())
            if len(arrivals) == kill_after:
                thread.start()
    finally:
        thread.join()
        await master.close()
    return [t - arrivals[0] for t in arrivals], restarted["s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--kill-after", type=int, default=8)
    args = parser.parse_args()
    model = args.model or demo_gguf()
    n_layers = LlamaConfig.from_folder(open_model(model).folder).n_layers
    half = n_layers // 2
    layers = {"w1": [f"model.layers.0-{half - 1}"], "w2": [f"model.layers.{half}-{n_layers - 1}"]}
    info = machine_info(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        topology = Path(tmp) / "topology.yml"
        started = time.perf_counter()
        cluster = start_local_cluster(model, layers, topology, extra=EXTRA, timeout=1800)
        first_start = time.perf_counter() - started
        workers = {worker.name: worker for worker in cluster}
        try:
            workers["w2"].stop()
            workers["w2"], warm_start = restart(model, topology, workers["w2"])
            arrivals, restart_s = asyncio.run(
                generate(model, topology, workers, args.tokens, args.kill_after)
            )
        finally:
            for worker in workers.values():
                worker.stop()
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    stall = max(gaps)
    usual = sorted(gaps)[len(gaps) // 2]
    result = {
        "model": str(model),
        "layers": layers,
        "cluster_first_start_s": first_start,
        "warm_start_s": warm_start,
        "restart_during_generation_s": restart_s,
        "stall_s": stall,
        "median_token_gap_s": usual,
        "ratio": stall / warm_start,
    }
    print(f"\nCPU: {cpu_label(info)}; {model.name}, 2 workers ({layers})\n")
    print("| worker warm start | restart during generation | generation stall | ratio |")
    print("|---|---|---|---|")
    print(
        f"| {warm_start:.2f} s | {restart_s:.2f} s | {stall:.2f} s "
        f"(a token takes {usual * 1e3:.0f} ms) | {stall / warm_start:.2f}x |"
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "recovery.json"
    out.write_text(json.dumps({"machine": info, **result}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
