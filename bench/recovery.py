"""Issue 24's recovery measurement: a worker killed mid-generation and restarted, how long the
generation stalls, against that worker's own warm start.

    python -m bench.recovery [--model FILE.gguf] [--tokens 24] [--kill-after 8]

Two worker processes split the model's blocks in halves (the default model: the demo GGUF; the
issue's: `--model ~/.cache/cake/bench/llama-3-8b-shape-q4_0.gguf`, 16 blocks each). First the
second worker's warm start is timed alone (process start to its "serving" line; its packed
weights are in the cache from the cluster's first start). Then a master generates `--tokens`
greedy tokens and, after `--kill-after`, the second worker is killed (SIGKILL, as a crash) and
started again on its port; the stall is the longest pause between two tokens. Prints the table
(goal: stall <= 1.5x the warm start), where the stall went (a timeline from the kill: the new
process started, listening, its blocks loaded, serving; the master's log of the loss, its
reconnection and replay; the next token) and writes bench/results/recovery.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.machine import cpu_label, machine_info, write_result
from cake.cluster.local_cluster import WorkerProcess, start_local_cluster, worker_command
from cake.decoding.sampling import SamplingParams
from cake.master import Master, MasterSettings
from cake.model.config import LlamaConfig
from cake.model.demo import demo_gguf
from cake.model.opener import open_model

GREEDY = SamplingParams(temperature=0)
EXTRA = ("--device", "cpu", "--max-seq-len", "512")
# The victim's log lines and the master's log records that mark the recovery's steps.
WORKER_STEPS = {
    "meanwhile)": "worker listening",
    " runs blocks": "worker loaded",
    "serving blocks": "worker serving",
}
MASTER_STEPS = {
    "reconnecting": "master: loss noticed",
    "cannot connect": "master: first reconnection attempt",
    "is loading": "master: told it is loading",
    "connected to worker w2": "master: reconnected",
    "replaying": "master: replay started",
    "replayed": "master: replay done",
}


class Stamps(logging.Handler):
    """The master's log records, with the time each was made (time.perf_counter)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((time.perf_counter(), record.getMessage()))


def timeline(
    killed: float, victim: WorkerProcess, master: list[tuple[float, str]], arrivals: list[float]
) -> list[tuple[float, str]]:
    """(seconds after the kill, what happened) for each step of the recovery, in time order:
    the first line that marks each step."""
    events = [(victim.started, "worker process started")]
    heard = zip(victim.heard, victim.lines, strict=False)  # it may be between the two appends
    for steps, lines in (
        (WORKER_STEPS, list(heard)),
        (MASTER_STEPS, [(t, m) for t, m in master if t >= killed]),
    ):
        for marker, step in steps.items():
            events += [(t, step) for t, line in lines if marker in line][:1]
    events += [(t, "next token") for t in arrivals if t > killed][:1]
    return sorted((t - killed, step) for t, step in events)


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
) -> tuple[list[float], float, list[tuple[float, str]]]:
    """Token arrival times (seconds from the first), the victim's restart time, and the
    recovery's timeline."""
    master = await Master.open(
        MasterSettings(model, topology, device="cpu", max_seq_len=512, retry_timeout=600)
    )
    arrivals: list[float] = []
    restarted: dict[str, float] = {}
    stamps = Stamps()
    cake_log = logging.getLogger("cake")
    cake_log.addHandler(stamps)
    cake_log.setLevel(logging.INFO)

    def crash_and_restart() -> None:
        restarted["killed"] = time.perf_counter()
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
        cake_log.removeHandler(stamps)
    steps = timeline(restarted["killed"], workers["w2"], stamps.records, arrivals)
    return [t - arrivals[0] for t in arrivals], restarted["s"], steps


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
            arrivals, restart_s, steps = asyncio.run(
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
        "timeline_s": [[round(t, 3), step] for t, step in steps],
    }
    print(f"\nCPU: {cpu_label(info)}; {model.name}, 2 workers ({layers})\n")
    print("| worker warm start | restart during generation | generation stall | ratio |")
    print("|---|---|---|---|")
    print(
        f"| {warm_start:.2f} s | {restart_s:.2f} s | {stall:.2f} s "
        f"(a token takes {usual * 1e3:.0f} ms) | {stall / warm_start:.2f}x |"
    )
    print("\n| after the kill | step |\n|---|---|")
    for t, step in steps:
        print(f"| {t:.2f} s | {step} |")
    out = write_result("recovery", {"machine": info, **result})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
