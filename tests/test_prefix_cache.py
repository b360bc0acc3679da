"""The prefix cache: a request that starts with the tokens of a finished one computes only the
rest, and its text is the same as without the cache (greedy), locally, over workers, with
concurrent requests, with drafting, under a tight budget, and after a worker restart."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch
from cluster import GREEDY, cluster
from cluster import ProcessCluster as Cluster
from helpers import greedy_tokens, until

from cake.decoding.speculative import DraftSettings
from cake.decoding.stats import GenerationStats
from cake.engine.prefix_cache import CachedPrefix, PrefixCache, common_prefix_length
from cake.engine.session_store import SessionStore
from cake.errors import CakeError, Code
from cake.master import Master, MasterSettings
from cake.model.loader import load_llama

CONTEXT = 512  # the tiny model's max_position_embeddings
N = 10
SYSTEM = [128000, *range(2000, 2090)]  # a shared "system prompt" of 91 tokens
TURN_1 = [*SYSTEM, 9906, 1917, 0, 13]


# ---------------------------------------------------------------------- the index


def test_common_prefix_length_counts_shared_leading_tokens() -> None:
    long = list(range(300))
    assert common_prefix_length(long, long) == 300
    assert common_prefix_length(long, long[:130]) == 130
    assert common_prefix_length(long, [*long[:200], -1, *long[201:]]) == 200
    assert common_prefix_length(long, [-1]) == 0
    assert common_prefix_length([], long) == 0


def entry(session_id: str, tokens: list[int], epoch: int = 0) -> CachedPrefix:
    return CachedPrefix(session_id, tuple(tokens), (len(tokens),), epoch)


def test_lookup_takes_the_longest_prefix_and_leaves_the_last_token_to_compute() -> None:
    cache = PrefixCache()
    cache.add(entry("a", [1, 2, 3, 4, 5]))
    cache.add(entry("b", [1, 2, 9]))
    match = cache.lookup([1, 2, 3, 4, 5, 6], epoch=0)
    assert match is not None and (match.entry.session_id, match.length) == ("a", 5)
    # The whole prompt is cached: its last token still runs, for the next token's logits.
    match = cache.lookup([1, 2, 3, 4, 5], epoch=0)
    assert match is not None and match.length == 4
    assert cache.lookup([7, 1, 2], epoch=0) is None
    assert cache.lookup([1, 2, 3], epoch=1) is None  # stages replaced: nothing there


def test_add_lets_go_of_contained_entries_then_the_least_recently_used() -> None:
    cache = PrefixCache(max_entries=2)
    assert cache.add(entry("turn1", [1, 2, 3])) == []
    assert cache.add(entry("turn2", [1, 2, 3, 4, 5])) == ["turn1"]  # the next turn holds it
    assert cache.add(entry("other", [8, 9])) == []
    cache.lookup([1, 2, 3, 4, 5, 6], epoch=0)  # turn2 used: "other" is the oldest now
    assert cache.add(entry("third", [7, 7])) == ["other"]
    assert cache.add(entry("new-epoch", [6], epoch=1)) == ["turn2", "third"]
    assert cache.session_ids() == ["new-epoch"]
    with pytest.raises(ValueError):
        PrefixCache(max_entries=0)


# ---------------------------------------------------------------------- the session store


@pytest.fixture(scope="module")
def part(tiny_llama: Path):
    return load_llama(tiny_llama, range(4), max_seq_len=CONTEXT)


def fill(store: SessionStore, key: str, length: int, seed: int = 0) -> torch.Tensor:
    session = store.get(key) or store.open(key)
    hidden = torch.randn(1, length, 64, generator=torch.Generator().manual_seed(seed))
    store.claim(session, session.length, length)
    for block in store.blocks:
        session.block_ends[block] = session.length
    try:
        with torch.inference_mode():
            return store.model.run_blocks(hidden, 0, session.caches, store.blocks)
    finally:
        store.release(session)


def test_fork_copies_the_prefix_and_the_copies_never_mix(part) -> None:
    store = SessionStore(part, range(4), CONTEXT, budget_bytes=1 << 30, page=16)
    fill(store, "parent", 40)
    with pytest.raises(CakeError) as refused:  # a running session is no prefix to fork
        store.fork("parent", "child", 30, "parent")
    assert refused.value.code is Code.UNKNOWN_SESSION
    store.retain("parent")
    child = store.fork("parent", "child", 30, "parent")
    parent = store.get("parent")
    assert parent is not None and child.length == 30 and child.block_ends[0] == 30
    for block in range(4):
        assert torch.equal(child.caches[block].k[:, :, :30], parent.caches[block].k[:, :, :30])
    child.caches[0].k[:, :, :30] = 0  # the child's own copy: the parent keeps its keys
    assert parent.caches[0].k[:, :, :30].abs().sum() > 0
    with pytest.raises(CakeError, match="holds 40 positions"):
        store.fork("parent", "greedy", 41, "parent")
    with pytest.raises(CakeError, match="not held"):
        store.fork("nobody", "orphan", 1, "nobody")
    assert store.keys() == ["parent", "child"]


def test_a_fork_that_holds_the_whole_prefix_takes_its_caches(part) -> None:
    store = SessionStore(part, range(4), CONTEXT, budget_bytes=1 << 30, page=16)
    fill(store, "turn1", 40)
    store.retain("turn1")
    parent = store.get("turn1")
    assert parent is not None
    reserved, keys = store.reserved_bytes, parent.caches[2].k
    turn2 = store.fork("turn1", "turn2", 38, "turn1", move=True)
    assert store.keys() == ["turn2"] and store.reserved_bytes == reserved
    assert turn2.caches[2].k is keys and turn2.length == 38 and not turn2.cached


def test_cached_prefixes_go_first_when_room_or_slots_run_short(part) -> None:
    page_bytes = 16 * 4 * 256  # 16 positions over 4 blocks at 256 B
    store = SessionStore(
        part, range(4), CONTEXT, budget_bytes=4 * page_bytes, page=16, max_sessions=3
    )
    for name in ("old", "recent"):
        fill(store, name, 16)
        store.retain(name)
    fill(store, "live", 16)
    # Two more pages: the least recently used cached prefix goes, the live session stays.
    fill(store, "big", 32)
    assert sorted(map(str, store.keys())) == ["big", "live", "recent"]
    store.retain("big")
    # A fourth session past --max-sessions 3: a cached one makes way for it.
    fill(store, "late", 1)
    assert store.get("recent") is None and store.cached_count() == 1
    # Nothing cached is left to evict: a session beyond the budget is refused as before.
    store.retain("late")
    store.close("late")
    with pytest.raises(CakeError) as refused:
        fill(store, "huge", 3 * 16 + 1)
    assert refused.value.code is Code.KV_MEMORY_FULL


# ---------------------------------------------------------------------- generations


async def chat(master: Master, prompt: list[int], stats: GenerationStats | None = None, **kw):
    return [t async for t in master.generate(prompt, GREEDY, N, True, stats, **kw)]


def second_turn(first: list[int]) -> list[int]:
    return [*TURN_1, *first, 128009, 882, 271, 3923, 374]


def test_next_turn_reuses_the_conversation_and_says_the_same(tiny_llama: Path) -> None:
    async def main() -> tuple[list[int], list[int], GenerationStats]:
        master = await Master.open(MasterSettings(tiny_llama, device="cpu", dtype="f32"))
        try:
            first = await chat(master, TURN_1)
            stats = GenerationStats()
            second = await chat(master, second_turn(first), stats)
        finally:
            await master.close()
        return first, second, stats

    first, second, stats = asyncio.run(main())
    assert first == greedy_tokens(tiny_llama, TURN_1, N)
    assert second == greedy_tokens(tiny_llama, second_turn(first), N)
    # Turn 1's prompt and its answer but the last token (chosen, never fed) came from the cache.
    assert stats.cached_tokens == len(TURN_1) + N - 1
    assert f"({stats.cached_tokens} cached)" in stats.summary()


def test_no_prefix_cache_computes_every_prompt(tiny_llama: Path) -> None:
    async def main() -> int:
        settings = MasterSettings(tiny_llama, device="cpu", dtype="f32", prefix_cache=False)
        master = await Master.open(settings)
        try:
            await chat(master, TURN_1)
            stats = GenerationStats()
            await chat(master, TURN_1, stats)
            assert len(master.pipeline.stages) == 1
        finally:
            await master.close()
        return stats.cached_tokens

    assert asyncio.run(main()) == 0


def test_over_two_workers_concurrent_requests_share_the_prefix(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """A shared system prompt, then four requests at once (batched steps) that fork from it,
    one of them drafting: each says what it says alone, without the cache."""
    layers = {"w1": ["model.layers.0-1"], "w2": ["model.layers.2-3"]}
    prompts = [[*SYSTEM, 3923 + i, 374, 279] for i in range(4)]

    async def main():
        async with cluster(tiny_llama, tmp_path, layers) as (topology, workers):
            settings = MasterSettings.serving(
                model=tiny_llama, topology=topology, device="cpu", dtype="f32"
            )
            master = await Master.open(settings)
            try:
                warm = await chat(master, [*SYSTEM, 11])
                stats = [GenerationStats() for _ in prompts]
                lookup = DraftSettings(mode="lookup", tokens=3)
                texts = await asyncio.gather(
                    *(
                        chat(master, prompt, s, draft=lookup if i == 3 else None)
                        for i, (prompt, s) in enumerate(zip(prompts, stats, strict=True))
                    )
                )
                await until(lambda: all(w.store.cached_count() >= 1 for w in workers.values()))
            finally:
                await master.close()
            return warm, texts, stats

    warm, texts, stats = asyncio.run(main())
    assert warm == greedy_tokens(tiny_llama, [*SYSTEM, 11], N)
    assert texts == [greedy_tokens(tiny_llama, prompt, N) for prompt in prompts]
    assert [s.cached_tokens for s in stats] == [len(SYSTEM)] * 4


def test_budget_evicts_cached_prefixes_before_refusing(tiny_llama: Path, tmp_path: Path) -> None:
    """w1 holds 300 KiB (blocks 0-1, 512 B/position): two long conversations do not fit side
    by side, so the first one's cached prefix goes to make room for the second."""
    layers = {"w1": ["model.layers.0-1"], "w2": ["model.layers.2-3"]}
    long_a = [(i * 7919) % 120000 + 1000 for i in range(300)]
    long_b = [(i * 104729) % 120000 + 1000 for i in range(300)]

    async def main():
        async with cluster(tiny_llama, tmp_path, layers, kv_memory=300 * 1024) as (topology, ws):
            master = await Master.open(
                MasterSettings(tiny_llama, topology, device="cpu", dtype="f32")
            )
            try:
                a = await chat(master, long_a)
                b = await chat(master, long_b)  # evicts a's cached prefix on the workers
                await until(lambda: ws["w1"].store.cached_count() == 1)  # b's alone
                stats = GenerationStats()
                again = await chat(master, [*long_a, *a, 13], stats)  # a is gone: computed
            finally:
                await master.close()
            return a, b, again, stats

    a, b, again, stats = asyncio.run(main())
    assert [a, b] == [greedy_tokens(tiny_llama, ids, N) for ids in (long_a, long_b)]
    assert again == greedy_tokens(tiny_llama, [*long_a, *a, 13], N)
    assert stats.cached_tokens == 0


@pytest.mark.slow
def test_worker_restarted_mid_conversation_says_the_same(tiny_llama: Path, tmp_path: Path) -> None:
    """w2 is killed and restarted during the second turn (a forked session: its replay
    rebuilds the cached prefix too), then again before the third (the cache on it is gone: the
    third turn computes its whole prompt)."""
    layers = {"w1": ["model.layers.0-1"], "w2": ["model.layers.2-3"]}
    workers = Cluster(tiny_llama, tmp_path / "topology.yml", layers)
    restarted = threading.Thread()

    async def main():
        nonlocal restarted
        master = await Master.open(
            MasterSettings(tiny_llama, workers.topology, device="cpu", dtype="f32")
        )
        try:
            first = await chat(master, TURN_1)
            second: list[int] = []
            stats = GenerationStats()
            async for token in master.generate(second_turn(first), GREEDY, N, True, stats):
                second.append(token)
                if len(second) == 3:
                    workers.kill("w2")
                    restarted = threading.Thread(target=workers.restart, args=("w2",))
                    restarted.start()
            restarted.join()
            workers.kill("w2")
            await asyncio.to_thread(workers.restart, "w2")
            third_prompt = [*second_turn(first), *second, 13]
            third_stats = GenerationStats()
            third = await chat(master, third_prompt, third_stats)
        finally:
            await master.close()
        return first, second, stats, third, third_stats

    try:
        first, second, stats, third, third_stats = asyncio.run(main())
    finally:
        restarted.join()
        workers.stop()
    assert second == greedy_tokens(tiny_llama, second_turn(first), N)
    assert stats.cached_tokens == len(TURN_1) + N - 1
    third_prompt = [*second_turn(first), *second, 13]
    assert third == greedy_tokens(tiny_llama, third_prompt, N)
    assert third_stats.cached_tokens == 0
