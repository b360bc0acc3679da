"""Where a worker computes: inline on its event loop or on its compute thread, same results."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from cluster import N_TOKENS, cluster, generate
from helpers import greedy_tokens

from cake.engine.worker_requests import INLINE_MAX_POSITIONS
from cake.master import Master, MasterSettings
from cake.worker import Worker

PROMPT = "Tell me about the sea and the sky, in a few words please."  # > 16 tokens with template


def _record_threads(worker: Worker) -> list[tuple[int, str]]:
    """(positions, thread name) of every forward the worker runs from now on."""
    seen: list[tuple[int, str]] = []
    run = worker.requests.run_request

    def recording(session, request):  # type: ignore[no-untyped-def]
        seen.append((request.hidden.shape[1], threading.current_thread().name))
        return run(session, request)

    worker.requests.run_request = recording  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("compute", ["auto", "inline", "thread"])
def test_every_dispatch_gives_the_local_tokens(
    tiny_llama: Path, tmp_path: Path, compute: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # auto: decode inline, prefill offloaded

    async def main() -> tuple[list[int], list[tuple[int, str]]]:
        layers = {"w1": ["model.layers.0-1"], "w2": ["model.layers.2-3"]}
        async with cluster(tiny_llama, tmp_path, layers, compute=compute) as (topology, workers):
            seen = _record_threads(workers["w1"])
            master = await Master.open(
                MasterSettings(
                    tiny_llama, topology=topology, device="cpu", dtype="f32", max_seq_len=256
                )
            )
            try:
                tokens, _ = await generate(master, PROMPT)
            finally:
                await master.close()
        return tokens, seen

    tokens, seen = asyncio.run(main())
    assert tokens == greedy_tokens(tiny_llama, PROMPT, N_TOKENS)
    prefill, decode = seen[0], seen[1:]
    assert prefill[0] > INLINE_MAX_POSITIONS and all(n == 1 for n, _ in decode)
    loop_thread = threading.main_thread().name  # asyncio.run's loop runs on this thread
    on_loop = {"auto": (False, True), "inline": (True, True), "thread": (False, False)}[compute]
    assert (prefill[1] == loop_thread) == on_loop[0], seen
    assert all((name == loop_thread) == on_loop[1] for _, name in decode), seen


def test_spinning_threads_keep_all_compute_on_one_thread(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under OMP_WAIT_POLICY=ACTIVE a second OpenMP team would spin forever: auto is inline."""
    from cake.model.loader import load_llama

    part = load_llama(tiny_llama, [0], max_seq_len=16)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert Worker("w", part, max_seq_len=16).requests.compute_mode == "inline"
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert Worker("w", part, max_seq_len=16).requests.compute_mode == "auto"
    with pytest.raises(ValueError, match="compute"):
        Worker("w", part, max_seq_len=16, compute="gpu")
