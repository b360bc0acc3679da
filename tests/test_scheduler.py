"""The step scheduler closing with rows in flight: a step held at a stage (by a gate) and a
request queued behind it. Every waiting session sees its generation cancelled, nothing hangs,
and the master closes cleanly; a closed scheduler takes no new session."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from api_server import ThrottledStage
from cluster import GREEDY, cluster
from helpers import until

from cake.master import Master, MasterSettings

HANG = 30  # s: no step of this test takes a fraction of that; past it, something hangs


async def _generate(master: Master, prompt: str) -> list[int]:
    ids = master.encode(prompt)
    return [t async for t in master.generate(ids, GREEDY, 50, ignore_eos=True)]


@pytest.mark.parametrize("layers", [None, {"w1": ["model.layers.0-3"]}], ids=["local", "worker"])
def test_close_with_a_step_held_cancels_its_sessions_and_the_queued_one(
    layers: dict | None, tiny_llama: Path, tmp_path: Path
) -> None:
    async def run(topology: Path | None, workers: dict) -> None:
        settings = MasterSettings.serving(
            model=tiny_llama, topology=topology, device="cpu", dtype="f32", batch_groups=1
        )
        master = await Master.open(settings)
        scheduler = master.scheduler
        try:
            # A decode step of both sessions (their caches are open on every stage by then)
            # is held at the first stage by a gate that is never opened.
            stage = ThrottledStage(
                master.pipeline.stages[0],
                gate=asyncio.Event(),
                hold=lambda rows: len(rows) == 2 and all(row.start_pos > 0 for row in rows),
            )
            master.pipeline.stages[0] = stage
            held = [asyncio.create_task(_generate(master, p)) for p in ("hi", "tell me a story")]
            await until(lambda: stage.held == 1)
            local = [s for s in master.pipeline.stages if not s.remote]
            assert sum(len(s.runner.store) for s in local) == (2 if local else 0)
            assert all(worker.session_count == 2 for worker in workers.values())
            queued = asyncio.create_task(_generate(master, "why"))
            (group,) = scheduler.groups
            await until(lambda: len(group.queue) == 1)  # waits behind the held step
            await asyncio.wait_for(scheduler.close(), HANG)
            for task in [*held, queued]:
                with pytest.raises(asyncio.CancelledError):
                    await asyncio.wait_for(task, HANG)
            assert stage.held == 0 and stage.in_flight == 0  # the held forward was cancelled
            assert not group.queue and all(t.done() for t in [*held, queued])
            with pytest.raises(RuntimeError, match="closed"):
                scheduler.open_session()
        finally:
            await asyncio.wait_for(master.close(), HANG)
        # The sessions are closed on every stage: the master's own store and the worker's.
        assert sum(len(s.runner.store) for s in local) == 0
        for worker in workers.values():
            await until(lambda worker=worker: worker.session_count == 0)
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not [t for t in leftover if not t.done()], leftover

    async def main() -> None:
        if layers is None:
            await run(None, {})
        else:
            async with cluster(tiny_llama, tmp_path, layers) as (topology, workers):
                await run(topology, workers)

    asyncio.run(main())
