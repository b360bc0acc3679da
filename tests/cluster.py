"""In-process workers on loopback for tests: fast (no process start), same code paths."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import yaml

from cake.cluster.local_cluster import WorkerProcess, start_local_cluster, worker_command
from cake.decoding.sampling import SamplingParams
from cake.decoding.stats import GenerationStats
from cake.master import Master
from cake.model.loader import load_llama
from cake.topology import parse_topology
from cake.worker import Worker

GREEDY = SamplingParams(temperature=0)
N_TOKENS = 12


@contextlib.asynccontextmanager
async def cluster(
    folder: Path,
    tmp_path: Path,
    layers: dict[str, list[str]],
    serve_as: dict | None = None,
    **worker_options: Any,
) -> AsyncIterator[tuple[Path, dict[str, Worker]]]:
    """In-process workers on 127.0.0.1:<free>, and a topology.yml that points at them.

    `serve_as` lets a worker load other blocks than the topology says (the refusal test).
    """
    dummy = {name: {"host": "127.0.0.1:1", "layers": entries} for name, entries in layers.items()}
    planned = parse_topology(yaml.safe_dump(dummy))
    actual = parse_topology(yaml.safe_dump({**dummy, **(serve_as or {})}))
    workers, servers, spec = {}, [], {}
    for node in planned.nodes:
        part = load_llama(folder, actual.node(node.name).blocks, max_seq_len=512)
        worker = Worker(node.name, part, max_seq_len=512, **worker_options)
        server = await worker.serve("127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        workers[node.name], spec[node.name] = worker, dict(dummy[node.name])
        spec[node.name]["host"] = f"127.0.0.1:{port}"
        servers.append(server)
    path = tmp_path / "topology.yml"
    path.write_text(yaml.safe_dump(spec))
    try:
        yield path, workers
    finally:
        for server in servers:
            server.close()
        for worker in workers.values():
            for link in list(worker.links):
                link.close()
            worker.requests.shutdown()


async def generate(
    master: Master, prompt: str, n: int = N_TOKENS
) -> tuple[list[int], GenerationStats]:
    """Greedy tokens (EOS ignored) from an open master, and the run's stats. For the tokens of a
    model alone, see helpers.greedy_tokens."""
    stats = GenerationStats()
    ids = master.encode(prompt)
    tokens = [t async for t in master.generate(ids, GREEDY, n, ignore_eos=True, stats=stats)]
    return tokens, stats


@contextlib.contextmanager
def workers_in_thread(
    folder: Path, tmp_path: Path, layers: dict[str, list[str]], **worker_options: Any
) -> Iterator[tuple[Path, dict[str, Worker]]]:
    """`cluster` served from a background thread's event loop, for a master in another
    process (or another loop): yields the topology.yml and the workers."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        try:
            async with cluster(folder, tmp_path, layers, **worker_options) as (topology, workers):
                box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
                box["cluster"] = topology, workers
                ready.set()
                await box["stop"].wait()
        finally:
            ready.set()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    ready.wait(120)
    if "cluster" not in box:
        thread.join(10)
        raise RuntimeError("the workers' thread did not start (see its traceback above)")
    try:
        yield box["cluster"]
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(30)


class ProcessCluster:
    """Worker processes on 127.0.0.1 (each on a port of its own choosing), that a test can kill
    and restart on the same port, as a crashed and restarted worker would come back."""

    def __init__(self, model: Path, topology: Path, layers: dict[str, list[str]]) -> None:
        self.model, self.topology = model, topology
        self.workers = {w.name: w for w in start_local_cluster(model, layers, topology)}

    def kill(self, name: str) -> None:
        self.workers[name].kill()

    def restart(self, name: str) -> None:
        """Start it again on the port it had (the one the topology names)."""
        address = f"127.0.0.1:{self.workers[name].port}"
        command = worker_command(self.model, name, self.topology, address, ("--device", "cpu"))
        process = WorkerProcess(name, command)
        self.workers[name] = process
        process.wait_ready()

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()
