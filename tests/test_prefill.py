"""Chunked prefill: a prompt several chunks long gives the same greedy text over workers as
locally and as transformers, pipelined or not, and survives a worker lost mid-prefill."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from cluster import GREEDY, cluster
from helpers import greedy_tokens, reference_tokens

from cake.cluster.local_cluster import WorkerProcess, start_local_cluster, worker_command
from cake.decoding.stats import GenerationStats
from cake.master import Master, MasterSettings

PROMPT = [128000] + [(i * 7919) % 120000 + 1000 for i in range(69)]  # 70 tokens
CHUNK = 16  # 5 chunks: 16, 16, 16, 16, 6
N = 10


async def greedy(master: Master, stats: GenerationStats | None = None) -> list[int]:
    return [t async for t in master.generate(PROMPT, GREEDY, N, ignore_eos=True, stats=stats)]


@pytest.fixture(scope="module")
def expected(tiny_llama: Path) -> list[int]:
    """The local greedy text, checked against transformers (the prompt in one forward)."""
    tokens = greedy_tokens(tiny_llama, PROMPT, N)
    assert tokens == reference_tokens(tiny_llama, PROMPT, N)
    return tokens


TOPOLOGIES = {
    "two workers": ({"w1": ["model.layers.0-1"], "w2": ["model.layers.2-3"]}, 2),
    "three workers, last block on the master": (
        {"w1": ["model.layers.0"], "w2": ["model.layers.1"], "w3": ["model.layers.2"]},
        3,
    ),
}


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "one chunk at a time"])
@pytest.mark.parametrize("name", list(TOPOLOGIES))
def test_chunked_prompt_over_workers_equals_local(
    name: str, pipelined: bool, tiny_llama: Path, expected: list[int], tmp_path: Path
) -> None:
    layers, remote_runs = TOPOLOGIES[name]
    frames: list[int] = []

    async def main() -> tuple[list[int], GenerationStats]:
        async with cluster(tiny_llama, tmp_path, layers) as (topology, workers):
            for worker in workers.values():
                run_request = worker.requests.run_request

                def recording(session, request, run_request=run_request):  # type: ignore[no-untyped-def]
                    frames.append(request.hidden.shape[1])
                    return run_request(session, request)

                worker.requests.run_request = recording  # type: ignore[method-assign]
            master = await Master.open(
                MasterSettings(tiny_llama, topology, device="cpu", dtype="f32", prefill_chunk=CHUNK)
            )
            master.pipeline.overlap = pipelined
            try:
                stats = GenerationStats()
                return await greedy(master, stats), stats
            finally:
                await master.close()

    tokens, stats = asyncio.run(main())
    assert tokens == expected
    chunks = -(-len(PROMPT) // CHUNK)
    assert stats.round_trips == remote_runs * (chunks + stats.decode_steps)
    assert max(frames) == CHUNK  # no request carried more than one chunk


@pytest.mark.slow  # a worker process, killed and restarted
def test_worker_lost_mid_prefill_is_replayed(
    tiny_llama: Path, expected: list[int], tmp_path: Path
) -> None:
    """w2 dies after its second chunk: the master reconnects, replays the two chunks it had
    sent (as they were sent: two requests), and the text is the same."""
    topology = tmp_path / "topology.yml"
    layers = {"w1": ["model.layers.0-1"], "w2": ["model.layers.2-3"]}
    workers = {w.name: w for w in start_local_cluster(tiny_llama, layers, topology)}
    restarted = threading.Thread()

    def restart() -> None:
        address = f"127.0.0.1:{workers['w2'].port}"  # the port the topology names
        command = worker_command(tiny_llama, "w2", topology, address, ("--device", "cpu"))
        workers["w2"] = WorkerProcess("w2", command)
        workers["w2"].wait_ready()

    async def main() -> tuple[list[int], GenerationStats]:
        nonlocal restarted
        master = await Master.open(
            MasterSettings(tiny_llama, topology, device="cpu", dtype="f32", prefill_chunk=CHUNK)
        )
        stage = master.pipeline.stages[1]
        forward, seen = stage.forward, 0

        async def forward_then_kill(*args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal seen, restarted
            out = await forward(*args, **kwargs)
            seen += 1
            if seen == 2:
                workers["w2"].kill()  # SIGKILL, as a crash
                restarted = threading.Thread(target=restart)
                restarted.start()
            return out

        stage.forward = forward_then_kill  # type: ignore[method-assign]
        try:
            stats = GenerationStats()
            return await greedy(master, stats), stats
        finally:
            await master.close()

    try:
        tokens, stats = asyncio.run(main())
        restarted.join()
    finally:
        for worker in workers.values():
            worker.stop()
    assert tokens == expected
    chunks = -(-len(PROMPT) // CHUNK)
    assert stats.round_trips == 2 * (chunks + stats.decode_steps) + 2  # + the replayed chunks
