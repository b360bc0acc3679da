"""The session store: caches grow with use, roll back, stay under a budget; the handshake
refuses workers whose limits do not fit the master's context."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from cluster import GREEDY, cluster
from helpers import greedy_tokens, until

from cake.engine.session_store import (
    SessionStore,
    check_worker_limits,
    kv_budget,
    kv_bytes_per_position,
)
from cake.errors import CakeError, Code, WorkerError
from cake.master import Master, MasterSettings
from cake.model.loader import load_llama
from cake.wire.protocol import Welcome
from cake.worker import Worker

CONTEXT = 512  # the tiny model's max_position_embeddings


@pytest.fixture(scope="module")
def part(tiny_llama: Path):
    """Blocks 0-3 of the tiny model (4 blocks, 2 KV heads of 16, float32: 256 B/position/block)."""
    return load_llama(tiny_llama, range(4), max_seq_len=CONTEXT)


def run(store: SessionStore, key: str, hidden: torch.Tensor, start_pos: int) -> torch.Tensor:
    session = store.get(key) or store.open(key)
    store.claim(session, start_pos, hidden.shape[1])
    try:
        with torch.inference_mode():
            return store.model.run_blocks(hidden, start_pos, session.caches, store.blocks)
    finally:
        store.release(session)


def hidden_states(length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, length, 64, generator=generator)


def test_kv_budget_takes_sizes_and_shares_of_free_memory() -> None:
    assert kv_budget("2GiB", torch.device("cpu")) == 2 * 1024**3
    assert kv_budget("8GB", torch.device("cpu")) == 8 * 10**9
    with pytest.raises(ValueError, match="--kv-memory 'lots'"):
        kv_budget("lots", torch.device("cpu"))
    with pytest.raises(ValueError, match="between 0% and 100%"):
        kv_budget("150%", torch.device("cpu"))
    assert 0 < kv_budget("10%", torch.device("cpu")) < kv_budget(None, torch.device("cpu"))


def test_many_short_sessions_cost_what_they_use(part) -> None:
    per_position = kv_bytes_per_position(4, 2, 16, torch.float32)
    assert per_position == 4 * 2 * 2 * 16 * 4
    store = SessionStore(part, range(4), CONTEXT, budget_bytes=1 << 30, page=64)
    for i in range(32):
        run(store, f"s{i}", hidden_states(5, i), 0)
        run(store, f"s{i}", hidden_states(1, 100 + i), 5)
    # One page of 64 positions each: what the caches really hold is what the store reserved.
    assert store.reserved_bytes == 32 * 64 * per_position
    assert store.tensor_bytes() == store.reserved_bytes
    assert store.reserved_bytes * (CONTEXT // 64) == 32 * CONTEXT * per_position
    # Growing past a page takes the next page, no more.
    run(store, "s0", hidden_states(100, 7), 6)
    assert store.get("s0").capacity == 128
    assert store.tensor_bytes() == store.reserved_bytes == 33 * 64 * per_position
    for i in range(32):
        assert store.close(f"s{i}")
    assert store.reserved_bytes == 0 and store.tensor_bytes() == 0 and len(store) == 0


def test_growing_cache_equals_one_pass(part) -> None:
    """cached == uncached: a sequence fed in uneven pieces across page boundaries gives the same
    hidden states as one pass over the whole sequence."""
    whole = hidden_states(150)
    store = SessionStore(part, range(4), CONTEXT, budget_bytes=1 << 30, page=16)
    expected = run(store, "whole", whole, 0)
    pieces, start = [], 0
    for length in (1, 15, 1, 17, 33, 1, 1, 64, 17):
        pieces.append(run(store, "pieces", whole[:, start : start + length], start))
        start += length
    assert start == 150
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("explicit", [True, False], ids=["rollback", "earlier start"])
def test_rolled_back_positions_are_never_attended(part, explicit: bool) -> None:
    store = SessionStore(part, range(4), CONTEXT, budget_bytes=1 << 30, page=16)
    prefix, truth = hidden_states(20, 1), hidden_states(6, 2)
    drafts = hidden_states(11, 3) * 1000  # would swamp any position that attends to them
    run(store, "fresh", prefix, 0)
    expected = run(store, "fresh", truth, 20)
    run(store, "spec", prefix, 0)
    run(store, "spec", drafts, 20)  # 20..30, and grows the cache past them
    if explicit:
        store.rollback(store.get("spec"), 20)
        assert store.get("spec").length == 20
    got = run(store, "spec", truth, 20)  # positions 20..25: 26..30 must stay invisible
    assert torch.equal(got, expected)
    # And a decode step after it sees only the true positions too.
    step = hidden_states(1, 4)
    assert torch.equal(run(store, "spec", step, 26), run(store, "fresh", step, 26))
    with pytest.raises(ValueError, match="cannot roll back to 40"):
        store.rollback(store.get("spec"), 40)


def test_store_refuses_what_does_not_fit(part) -> None:
    per_session = 64 * kv_bytes_per_position(4, 2, 16, torch.float32)
    store = SessionStore(
        part, range(4), CONTEXT, budget_bytes=2 * per_session, max_sessions=3, page=64
    )
    run(store, "a", hidden_states(60), 0)
    run(store, "b", hidden_states(60), 0)
    with pytest.raises(CakeError, match=r"no KV memory left for positions 60\.\.64") as info:
        run(store, "a", hidden_states(5), 60)  # would need a second page
    assert info.value.code is Code.KV_MEMORY_FULL
    run(store, "a", hidden_states(4), 60)  # what fits its page still works
    with pytest.raises(CakeError, match="skips positions") as info:
        run(store, "b", hidden_states(1), 61)
    with pytest.raises(CakeError, match=f"context of {CONTEXT} positions") as info:
        run(store, "b", hidden_states(1), CONTEXT)
    assert info.value.code is Code.CONTEXT_FULL
    store.open("c")
    with pytest.raises(CakeError, match="already holds 3 sessions"):
        store.open("d")


def test_idle_sessions_are_evicted_for_room(part) -> None:
    per_session = 64 * kv_bytes_per_position(4, 2, 16, torch.float32)
    store = SessionStore(part, range(4), CONTEXT, budget_bytes=per_session, idle_timeout_s=60)
    run(store, "old", hidden_states(10), 0)
    store.get("old").last_used -= 61  # idle for longer than the timeout
    run(store, "new", hidden_states(10), 0)  # needs the room: the idle one goes
    assert store.get("old") is None and store.get("new") is not None
    assert store.tensor_bytes() == store.reserved_bytes == per_session


def test_budget_below_one_session_is_refused_at_start(tiny_llama: Path) -> None:
    part = load_llama(tiny_llama, [0, 1], max_seq_len=CONTEXT)
    with pytest.raises(ValueError, match=r"--kv-memory 1\.0 KiB cannot hold one session of 512"):
        Worker("w1", part, max_seq_len=CONTEXT, kv_memory=1024)


def test_handshake_refuses_a_shorter_worker_context(tiny_llama: Path, tmp_path: Path) -> None:
    async def main() -> None:
        async with cluster(tiny_llama, tmp_path, {"w1": ["model.layers.0-1"]}) as (topology, _):
            with pytest.raises(
                WorkerError,
                match=r"worker w1 at 127\.0\.0\.1:\d+ holds 512 positions per session \(its "
                r"--max-seq-len\), but the master's context is 1024: start the worker with "
                r"--max-seq-len 1024",
            ):
                await Master.open(
                    MasterSettings(
                        tiny_llama, topology, device="cpu", dtype="f32", max_seq_len=1024
                    )
                )

    asyncio.run(main())


def test_handshake_refuses_a_worker_budget_below_one_session(tiny_llama: Path) -> None:
    from cake.model.config import LlamaConfig

    config = LlamaConfig.from_folder(tiny_llama)
    welcome = Welcome(
        fingerprint="x",
        worker="w1",
        blocks=(0, 1),
        device="cpu",
        dtype="f32",
        max_seq_len=4096,
        kv_memory=100_000,
    )
    check_worker_limits("worker w1", welcome, config, 128)  # 64 KiB for 128 positions: fits
    with pytest.raises(WorkerError, match=r"worker w1 has 97\.7 KiB of KV memory .*2048 positions"):
        check_worker_limits("worker w1", welcome, config, 2048)


def test_full_budget_refuses_one_session_and_the_others_go_on(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """w1 (blocks 0-1, 512 B/position) can hold 300 KiB: one long session and a short one fit,
    a second long one is refused on its own; the link and the first session go on."""
    layers = {"w1": ["model.layers.0-1"], "w2": ["model.layers.2-3"]}
    long_a = [(i * 7919) % 120000 + 1000 for i in range(300)]
    long_b = [(i * 104729) % 120000 + 1000 for i in range(300)]
    short = [128000, 9906, 1917]

    async def main() -> tuple[list[int], list[int]]:
        async with cluster(tiny_llama, tmp_path, layers, kv_memory=300 * 1024) as (topology, ws):
            master = await Master.open(
                MasterSettings(tiny_llama, topology, device="cpu", dtype="f32")
            )
            try:
                first = master.generate(long_a, GREEDY, 8, ignore_eos=True)
                tokens = [await anext(first)]  # its prefill holds 320 positions on w1 and w2
                with pytest.raises(
                    WorkerError,
                    match=r"worker w1 .*failed a request: session \w+: worker w1 has no KV "
                    r"memory left for positions 0\.\.299 of blocks 0-1: they need 160\.0 KiB "
                    r"more, 140\.0 KiB of its 300\.0 KiB budget is free",
                ):
                    await anext(master.generate(long_b, GREEDY, 8, ignore_eos=True))
                other = [t async for t in master.generate(short, GREEDY, 8, ignore_eos=True)]
                tokens += [t async for t in first]
                # The refused session's budget comes back; the two that finished stay as
                # cached prefixes (evicted when room is short), once the workers read the closes.
                await until(
                    lambda: all(w.store.cached_count() == len(w.store) == 2 for w in ws.values())
                )
            finally:
                await master.close()
            return tokens, other

    tokens, other = asyncio.run(main())
    assert [tokens, other] == [greedy_tokens(tiny_llama, ids, 8) for ids in (long_a, short)]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_32_short_sessions_raise_a_worker_rss_by_what_they_use(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    """A worker process with 15 SmolLM2 blocks at a 4096-position context: 32 sessions of a few
    positions each. Preallocated caches would commit 32 x 92 MiB; pages cost 32 x 1.4 MiB."""
    from cake.cluster.local_cluster import start_local_cluster
    from cake.model.config import LlamaConfig, architecture_of
    from cake.topology import load_topology
    from cake.wire.protocol import fingerprint_config
    from cake.wire.worker_link import WorkerClient

    topology = tmp_path / "topology.yml"
    config = LlamaConfig.from_folder(smollm2_dir)
    (worker,) = start_local_cluster(
        smollm2_dir,
        {"w1": ["model.layers.0-14"]},
        topology,
        extra=("--device", "cpu", "--max-seq-len", "4096"),
    )

    async def main() -> tuple[int, int]:
        client = WorkerClient(
            load_topology(topology).node("w1"), fingerprint_config(architecture_of(config))
        )
        await client.connect()
        blocks = range(15)

        async def session(name: str) -> None:
            await client.forward(name, 0, blocks, torch.randn(1, 5, config.hidden_size))
            for position in range(5, 8):
                await client.forward(name, position, blocks, torch.randn(1, 1, config.hidden_size))

        try:
            await session("warm-up")  # thread pools and allocator arenas: not sessions' memory
            await client.close_session("warm-up")
            await until(lambda: "session warm-up closed" in worker.log)
            before = rss_bytes(worker.proc.pid)
            for i in range(32):
                await session(f"s{i}")
            after = rss_bytes(worker.proc.pid)
            return before, after
        finally:
            await client.close()

    try:
        before, after = asyncio.run(main())
    finally:
        worker.stop()
    growth = after - before
    per_session_pages = 64 * kv_bytes_per_position(
        15, config.n_kv_heads, config.head_dim, torch.float32
    )
    print(f"worker RSS +{growth / 2**20:.1f} MiB for 32 sessions "
          f"(their pages: {32 * per_session_pages / 2**20:.1f} MiB)")  # fmt: skip
    assert growth <= 150 * 2**20, f"32 short sessions grew the worker by {growth / 2**20:.0f} MiB"
