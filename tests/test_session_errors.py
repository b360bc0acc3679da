"""One request's error is that session's alone: the link that other sessions share stays up."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from cluster import GREEDY, cluster
from helpers import greedy_tokens

from cake.decoding.stats import GenerationStats
from cake.errors import WorkerError
from cake.master import Master, MasterSettings
from cake.worker import Worker

LAYERS = {"w1": ["model.layers.0-1"], "w2": ["model.layers.2-3"]}
SHORT = "hi"
N = 30


async def run_both(master: Master, failing: list[int], n_failing: int) -> tuple[object, list[int]]:
    """Generate from `failing` and from SHORT at once; (the first's outcome, the second's ids)."""
    stats = GenerationStats()

    async def first() -> list[int]:
        return [t async for t in master.generate(failing, GREEDY, n_failing, True)]

    async def second() -> list[int]:
        return [t async for t in master.generate(master.encode(SHORT), GREEDY, N, True, stats)]

    outcome, tokens = await asyncio.gather(first(), second(), return_exceptions=True)
    assert not isinstance(tokens, BaseException), tokens
    # No reconnection and no replay: exactly one round trip per stage per step.
    assert stats.round_trips == 2 * (stats.decode_steps + 1)
    return outcome, tokens


def channels(master: Master) -> list[object]:
    return [s.client.channel for s in master.pipeline.stages if s.remote]


def test_context_full_fails_only_its_session(tiny_llama: Path, tmp_path: Path) -> None:
    expected = greedy_tokens(tiny_llama, SHORT, N)

    async def run() -> None:
        async with cluster(tiny_llama, tmp_path, LAYERS) as (topology, workers):
            master = await Master.open(
                MasterSettings(tiny_llama, topology, device="cpu", max_seq_len=512)
            )
            # The workers' context shrinks to 256 after the handshake (which refuses a worker
            # whose context is shorter than the master's), as a worker restarted with a smaller
            # --max-seq-len between two steps would have it.
            for worker in workers.values():
                worker.store.max_seq_len = 256
            try:
                before = channels(master)
                long_prompt = master.encode("word " * 235)
                # It fits, but runs out of context mid-generation, while the other still runs.
                assert 256 - N < len(long_prompt) < 256
                outcome, tokens = await run_both(master, long_prompt, 60)
                assert isinstance(outcome, WorkerError)
                assert "do not fit the context of 256 positions of worker" in str(outcome)
                assert tokens == expected
                assert channels(master) == before and all(c.alive for c in before)
            finally:
                await master.close()

    asyncio.run(run())


def test_out_of_memory_names_the_worker_and_what_did_not_fit(
    tiny_llama: Path, tmp_path: Path
) -> None:
    expected = greedy_tokens(tiny_llama, SHORT, N)

    async def run() -> None:
        async with cluster(tiny_llama, tmp_path, LAYERS) as (topology, workers):
            master = await Master.open(
                MasterSettings(tiny_llama, topology, device="cpu", dtype="f32")
            )
            failing = master.encode("tell me something")
            worker: Worker = workers["w2"]
            real_run, doomed = worker.requests.run_request, set()

            def run_request(session, request):  # type: ignore[no-untyped-def]
                if request.start_pos == 0 and request.hidden.shape[1] == len(failing):
                    doomed.add(request.session)
                if request.session in doomed and request.start_pos == len(failing) + 5:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
                return real_run(session, request)

            worker.requests.run_request = run_request  # type: ignore[method-assign]
            try:
                before = channels(master)
                outcome, tokens = await run_both(master, failing, N)
                assert isinstance(outcome, WorkerError)
                message = str(outcome)
                assert message.startswith("worker w2 at 127.0.0.1:")
                assert "worker w2 ran out of memory on cpu computing 1 position(s) of session" in (
                    message
                )
                assert f"at {len(failing) + 5}.. through blocks 2-3" in message
                assert "Tried to allocate 2.00 GiB" in message
                assert tokens == expected
                assert channels(master) == before and all(c.alive for c in before)
            finally:
                await master.close()

    asyncio.run(run())


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"),
    ],
)
def test_cpu_allocation_failures_count_as_out_of_memory(error: Exception) -> None:
    from cake.engine.worker_requests import is_out_of_memory

    assert is_out_of_memory(error)
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
