"""The hand-offs of one decode step through a real worker, by where the worker computes.

    .venv/bin/python -m bench.worker_hop [--trips 1000]

bench/hop.py times the wire alone (an echo peer). Here the peer is cake's own `Worker` holding
one random block of SmolLM2's shape, so a round trip is the whole path of a decode step through
one worker: master loop -> socket -> worker loop -> [compute thread ->] block -> [-> loop] ->
socket -> master's reader task -> the waiting forward. The worker runs in its own process,
once per dispatch:

- `thread`: every forward on the worker's compute thread (cake before this change): two thread
  hand-offs per step (a futex wake of the compute thread, a self-pipe wake of the loop).
- `inline`: on the event loop (what `auto` does for a decode step when nothing else computes).
- `inline, spin`: the same with OMP_WAIT_POLICY=ACTIVE (a worker alone on its machine).

overhead = round trip - the worker's own compute time (which it reports in every Result).
Back to back (as with one worker) and after 20 ms idle (as in a pipeline, where each worker
sleeps while the others compute, so every wake-up is paid).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import statistics
import subprocess
import sys
import time

import torch

from cake.engine.remote_stage import RemoteStage
from cake.engine.stages import StageRow, StageTimes
from cake.model.config import LlamaConfig, architecture_of
from cake.model.loader import random_part
from cake.topology import Node
from cake.wire.protocol import fingerprint_config
from cake.wire.worker_link import WorkerClient
from cake.worker import Worker

log = logging.getLogger("bench")

# SmolLM2-135M's block shape: one block is about 0.2 ms of compute, so hand-offs are visible.
CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 1,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}
MAX_SEQ_LEN = 4096
# (label, the worker's compute dispatch, OMP_WAIT_POLICY in its process)
DISPATCHES = (
    ("thread (before)", "thread", "PASSIVE"),
    ("inline", "inline", "PASSIVE"),
    ("inline, spin", "inline", "ACTIVE"),
)
WARMUP_TRIPS = 50
IDLE_GAP_S = 0.02
IDLE_TRIPS = 100
BATCHES = 4


def _config() -> LlamaConfig:
    return LlamaConfig.from_dict(CONFIG, "bench.worker_hop")


async def serve(compute: str) -> None:
    """The worker peer: one random block, port 0; prints the port it got."""
    model = random_part(_config(), [0], torch.float32, torch.device("cpu"), max_seq_len=MAX_SEQ_LEN)
    worker = Worker("hop", model, MAX_SEQ_LEN, compute=compute)
    server = await worker.serve("127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


async def _trips(port: int, trips: int, idle_s: float) -> tuple[list[float], list[float]]:
    """(round trip µs, worker compute µs) of each decode-sized forward, new session each call."""
    config = _config()
    node = Node(name="hop", host="127.0.0.1", port=port, description="", blocks=(0,))
    stage = RemoteStage(WorkerClient(node, fingerprint_config(architecture_of(config))), range(1))
    await stage.client.connect()
    hidden = torch.randn(1, 1, config.hidden_size)  # (B, T=1, C): one decode position
    times, round_trips, computes = StageTimes(), [], []
    try:
        for position in range(WARMUP_TRIPS + trips):
            if idle_s:
                await asyncio.sleep(idle_s)
            before = times.compute_s
            started = time.perf_counter()
            await stage.forward([StageRow("hop", position, hidden.shape[1], times)], hidden)
            round_trips.append((time.perf_counter() - started) * 1e6)
            computes.append((times.compute_s - before) * 1e6)
        await stage.close_session("hop")
    finally:
        await stage.close()
    return round_trips[WARMUP_TRIPS:], computes[WARMUP_TRIPS:]


def _row(label: str, port: int, trips: int) -> dict:
    batches = [asyncio.run(_trips(port, trips // BATCHES, 0.0)) for _ in range(BATCHES)]
    idle_rt, idle_compute = asyncio.run(_trips(port, min(trips, IDLE_TRIPS), IDLE_GAP_S))

    def overhead(rts: list[float], computes: list[float]) -> float:
        return statistics.median(r - c for r, c in zip(rts, computes, strict=True))

    return {
        "dispatch": label,
        "trips": trips,
        "round_trip_us": min(statistics.median(rt) for rt, _ in batches),
        "compute_us": statistics.median(c for _, cs in batches for c in cs),
        "overhead_us": min(overhead(rt, cs) for rt, cs in batches),
        "after_idle_round_trip_us": statistics.median(idle_rt),
        "after_idle_overhead_us": overhead(idle_rt, idle_compute),
        "idle_gap_ms": IDLE_GAP_S * 1e3,
    }


def measure_worker_hop(trips: int = 1000) -> list[dict]:
    """One row per dispatch, each against its own worker process (best batch's medians)."""
    rows = []
    for label, compute, policy in DISPATCHES:
        env = {**os.environ, "OMP_WAIT_POLICY": policy, "PYTHONUNBUFFERED": "1"}
        peer = subprocess.Popen(
            [sys.executable, "-m", "bench.worker_hop", "--serve", compute],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert peer.stdout is not None
            port = int(peer.stdout.readline())
            log.info("worker hop: %s, %d round trips", label, trips)
            rows.append({**_row(label, port, trips), "omp_wait_policy": policy})
        finally:
            peer.terminate()
            try:
                peer.wait(5)
            except subprocess.TimeoutExpired:
                peer.kill()
                peer.wait()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve", choices=["thread", "inline", "auto"], help="(internal)")
    parser.add_argument("--trips", type=int, default=1000)
    options = parser.parse_args()
    if options.serve:
        logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(options.serve))
        return
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="[bench] %(message)s")
    for row in measure_worker_hop(options.trips):
        print(
            f"{row['dispatch']:>16}: round trip {row['round_trip_us']:.0f} us "
            f"(compute {row['compute_us']:.0f}, overhead {row['overhead_us']:.0f}); "
            f"after {row['idle_gap_ms']:g} ms idle: {row['after_idle_round_trip_us']:.0f} us, "
            f"overhead {row['after_idle_overhead_us']:.0f}"
        )


if __name__ == "__main__":
    main()
