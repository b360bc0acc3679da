"""Batched steps (several sessions' rows in one forward) against one session at a time.

The linear layers run on the stacked rows of every session; attention runs per session against
its own cache. A batch must give each session exactly what it would have got alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from api_server import ThrottledStage
from cluster import GREEDY, cluster
from helpers import build_random_llama, greedy_tokens, until

from cake.errors import WorkerError
from cake.master import Master, MasterSettings
from cake.model.kv_cache import Segment
from cake.model.llama import Llama
from cake.model.loader import load_llama
from cake.worker import Worker

ATOL = 1e-4
MAX_SEQ_LEN = 96


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Llama:
    folder: Path = build_random_llama(tmp_path_factory.mktemp("batch"), n_layers=3, seed=7)
    return load_llama(
        folder,
        range(3),
        with_embedding=True,
        with_head=True,
        dtype=torch.float32,
        max_seq_len=MAX_SEQ_LEN,
    )


def _logits_alone(model: Llama, steps: list[list[int]]) -> list[torch.Tensor]:
    """One session on its own: logits (T, vocab) of each step's tokens."""
    cache = model.new_cache(MAX_SEQ_LEN)
    out, pos = [], 0
    with torch.inference_mode():
        for tokens in steps:
            hidden = model.embed(torch.tensor([tokens]))
            hidden = model.run_blocks(hidden, pos, cache, model.blocks)
            out.append(model.head(hidden)[0])
            pos += len(tokens)
    return out


def test_segments_equal_sessions_alone(model: Llama) -> None:
    """Three sessions of different lengths, prefills and decodes mixed in the same steps."""
    gen = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist()

    # session -> its steps; a step of several tokens is a prefill chunk, of one a decode
    plans = {
        "a": [tokens(11), tokens(1), tokens(1), tokens(1)],
        "b": [tokens(3), tokens(7), tokens(1), tokens(1)],
        "c": [tokens(1), tokens(1), tokens(20), tokens(1)],
    }
    alone = {name: _logits_alone(model, steps) for name, steps in plans.items()}
    caches = {name: model.new_cache(MAX_SEQ_LEN) for name in plans}
    positions = dict.fromkeys(plans, 0)
    with torch.inference_mode():
        for step in range(4):
            names = list(plans) if step != 1 else ["b", "a", "c"]  # order must not matter
            segments, rows, offset = [], [], 0
            for name in names:
                step_tokens = plans[name][step]
                segments.append(Segment(caches[name], positions[name], offset, len(step_tokens)))
                rows.extend(step_tokens)
                offset += len(step_tokens)
            hidden = model.embed(torch.tensor([rows]))
            hidden = model.run_segments(hidden, segments, model.blocks)
            logits = model.head(hidden)[0]
            for name, segment in zip(names, segments, strict=True):
                got = logits[segment.offset : segment.offset + segment.length]
                torch.testing.assert_close(got, alone[name][step], atol=ATOL, rtol=0)
                positions[name] += segment.length


def test_single_segment_is_the_one_session_path(model: Llama) -> None:
    cache_a, cache_b = model.new_cache(MAX_SEQ_LEN), model.new_cache(MAX_SEQ_LEN)
    tokens = torch.tensor([[5, 9, 2, 7]])
    with torch.inference_mode():
        hidden = model.embed(tokens)
        one = model.run_blocks(hidden, 0, cache_a, model.blocks)
        seg = model.run_segments(hidden, [Segment(cache_b, 0, 0, 4)], model.blocks)
    assert torch.equal(one, seg)


# ------------------------------------------------------------------ the scheduler, end to end

PROMPTS = ["hi", "tell me a story about a cat", "x " * 40, "why", "1 2 3 4 5 6 7 8"]


async def _generate(master: Master, prompt: str, n: int) -> list[int]:
    ids = master.encode(prompt)
    return [t async for t in master.generate(ids, GREEDY, n, ignore_eos=True)]


async def _concurrent(master: Master, jobs: list[tuple[str, int, float]]) -> list[list[int]]:
    """Generations started `delay` seconds apart, each with its own length."""

    async def one(prompt: str, n: int, delay: float) -> list[int]:
        await asyncio.sleep(delay)  # arrivals spread over time, not a synchronisation
        return await _generate(master, prompt, n)

    return await asyncio.gather(*(one(*job) for job in jobs))


@pytest.mark.parametrize(
    ("layers", "groups"),
    [
        (None, 1),
        ({"w1": ["model.layers.0-1"], "w2": ["model.layers.2-3"]}, 2),
        ({"w1": ["model.layers.1"]}, 1),
    ],
    ids=["local", "two workers, two groups", "worker between master blocks"],
)
def test_concurrent_greedy_equals_solo(
    layers: dict | None, groups: int, tiny_llama: Path, tmp_path: Path
) -> None:
    """Sessions join mid-batch, leave early (different lengths), with very different prompt
    lengths (one longer than a prefill chunk): each gets exactly its solo text (the master's
    alone, one session at a time)."""
    jobs = [
        (p, n, d)
        for p, n, d in zip(PROMPTS, [12, 3, 9, 14, 6], [0, 0, 0.05, 0.1, 0.0], strict=True)
    ]
    solo = [greedy_tokens(tiny_llama, p, n) for p, n, _ in jobs]

    async def run(topology: Path | None) -> None:
        settings = MasterSettings.serving(
            model=tiny_llama,
            topology=topology,
            device="cpu",
            dtype="f32",
            batch_groups=groups,
            step_positions=16,
        )
        master = await Master.open(settings)
        scheduler = master.scheduler
        try:
            batched = await _concurrent(master, jobs)
        finally:
            await master.close()
        assert batched == solo
        # Fewer steps than rows: sessions really shared steps.
        assert scheduler.steps < scheduler.rows

    async def main() -> None:
        if layers is None:
            await run(None)
        else:
            async with cluster(tiny_llama, tmp_path, layers) as (topology, _):
                await run(topology)

    asyncio.run(main())


def test_one_frame_per_stage_per_step(tiny_llama: Path, tmp_path: Path) -> None:
    """Four sessions in lockstep through two workers: each step is one round trip per worker,
    whatever the number of sessions (the workers count the frames they receive)."""
    layers = {"w1": ["model.layers.0-1"], "w2": ["model.layers.2-3"]}

    async def main() -> None:
        async with cluster(tiny_llama, tmp_path, layers) as (topology, workers):
            settings = MasterSettings.serving(
                model=tiny_llama, topology=topology, device="cpu", dtype="f32", batch_groups=1
            )
            master = await Master.open(settings)
            scheduler = master.scheduler
            # Every member is waited for (a loaded machine can take longer than the default
            # few milliseconds to sample): the frames per step are what this test counts.
            scheduler.gather_s = 10.0
            try:
                frames = _count_batches(workers.values())
                await _concurrent(master, [("same length", 8, 0)] * 4)
            finally:
                await master.close()
        assert scheduler.rows == 4 * scheduler.steps  # all four in every step
        assert frames == {"w1": scheduler.steps, "w2": scheduler.steps}

    asyncio.run(main())


def _count_batches(workers: Iterable[Worker]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for worker in workers:
        counts[worker.name] = 0
        original = worker.requests.run_batch

        def counted(request: Any, rows: Any, worker: Worker = worker, original: Any = original):
            counts[worker.name] += 1
            return original(request, rows)

        worker.requests.run_batch = counted  # type: ignore[method-assign]
    return counts


def test_a_refused_session_fails_alone(tiny_llama: Path, tmp_path: Path) -> None:
    """A worker whose context is too short for one session refuses that session only; the
    other sessions in the same steps go on to their solo text."""
    layers = {"w1": ["model.layers.0-3"]}

    async def main() -> None:
        async with cluster(tiny_llama, tmp_path, layers) as (topology, workers):
            settings = MasterSettings.serving(
                model=tiny_llama, topology=topology, device="cpu", dtype="f32"
            )
            master = await Master.open(settings)
            try:
                workers["w1"].store.max_seq_len = 40  # the long prompt no longer fits there
                results = await asyncio.gather(
                    _generate(master, "hi", 6),
                    _generate(master, "x " * 50, 4),
                    return_exceptions=True,
                )
            finally:
                await master.close()
        assert results[0] == greedy_tokens(tiny_llama, "hi", 6)
        assert isinstance(results[1], WorkerError)
        assert "context" in str(results[1])

    asyncio.run(main())


def test_cancelled_mid_step_frees_its_session_and_spares_the_other(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """A generation cancelled while its row is in a step (held there by a gate) leaves no
    session on the worker, and the one that shared its steps still gets its solo text."""
    layers = {"w1": ["model.layers.0-3"]}

    async def main() -> None:
        async with cluster(tiny_llama, tmp_path, layers) as (topology, workers):
            settings = MasterSettings.serving(
                model=tiny_llama, topology=topology, device="cpu", dtype="f32"
            )
            master = await Master.open(settings)
            try:
                solo = greedy_tokens(tiny_llama, "hi", 10)
                gate = asyncio.Event()
                stage = ThrottledStage(master.pipeline.stages[0], gate=gate)
                master.pipeline.stages[0] = stage
                keep = asyncio.create_task(_generate(master, "hi", 10))
                drop = asyncio.create_task(_generate(master, "bye", 200))
                await until(lambda: stage.in_flight == 1 and len(stage.sessions_seen[-1]) == 2)
                drop.cancel()  # its row is in the held step
                gate.set()
                with pytest.raises(asyncio.CancelledError):
                    await drop
                assert await keep == solo
                await until(lambda: workers["w1"].session_count == 0)
            finally:
                await master.close()

    asyncio.run(main())
