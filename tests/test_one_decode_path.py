"""One decode path: every caller's positions go through the one step scheduler, and a drafting
request's verification rows ride in the same steps as everyone else's."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cluster import GREEDY

from cake.decoding.speculative import DraftSettings
from cake.decoding.stats import GenerationStats
from cake.master import Master, MasterSettings

# A prompt that repeats itself, so that prompt lookup finds drafts to propose.
REPEATING = "one two three four five six seven eight one two three four five six seven eight"


async def _tokens(
    master: Master, prompt: str, n: int, draft: DraftSettings | None = None
) -> tuple[list[int], GenerationStats]:
    stats = GenerationStats()
    ids = master.encode(prompt, raw=True)
    out = [t async for t in master.generate(ids, GREEDY, n, True, stats, draft=draft)]
    return out, stats


def test_a_cli_generation_is_a_step_per_forward(tiny_llama: Path) -> None:
    """The CLI's generation goes through the scheduler: one step for the prompt, one per
    decode step, each carrying one row."""

    async def run() -> tuple[GenerationStats, int, int]:
        master = await Master.open(MasterSettings(tiny_llama, device="cpu", dtype="f32"))
        try:
            _, stats = await _tokens(master, "hello there", 9)
            return stats, master.scheduler.steps, master.scheduler.rows
        finally:
            await master.close()

    stats, steps, rows = asyncio.run(run())
    assert steps == rows == 1 + stats.decode_steps == 9


def test_perplexity_windows_are_steps(tiny_llama: Path) -> None:
    async def run() -> tuple[int, int]:
        master = await Master.open(MasterSettings(tiny_llama, device="cpu", dtype="f32"))
        try:
            result = await master.perplexity(list(range(1000, 1100)), window=40)
            return result.tokens, master.scheduler.steps
        finally:
            await master.close()

    tokens, steps = asyncio.run(run())
    assert tokens == 100 - 3  # three windows, each scores all but its first token
    assert steps == 3


@pytest.mark.parametrize("layers", [None, {"w1": ["model.layers.0-3"]}], ids=["local", "worker"])
def test_drafting_rows_share_steps_with_plain_rows(
    layers: dict | None, tiny_llama: Path, tmp_path: Path
) -> None:
    """A drafting generation and a plain one at once on a serving master: each gets its solo
    text, the drafter drafted, and steps carried both sessions' rows (a verification row of
    several positions beside a single decode position)."""
    from cluster import cluster

    async def run(topology: Path | None) -> None:
        settings = MasterSettings.serving(
            model=tiny_llama, topology=topology, device="cpu", dtype="f32", batch_groups=1
        )
        master = await Master.open(settings)
        lookup = DraftSettings("lookup", 4)
        try:
            solo_draft, _ = await _tokens(master, REPEATING, 24, lookup)
            solo_plain, _ = await _tokens(master, "tell me a story", 24)
            steps, rows = master.scheduler.steps, master.scheduler.rows
            (drafted, stats), (plain, _) = await asyncio.gather(
                _tokens(master, REPEATING, 24, lookup), _tokens(master, "tell me a story", 24)
            )
            shared = (master.scheduler.rows - rows) - (master.scheduler.steps - steps)
        finally:
            await master.close()
        assert drafted == solo_draft and plain == solo_plain
        assert stats.drafted > 0 and stats.accepted > 0
        assert shared > 0  # some steps carried both sessions

    async def main() -> None:
        if layers is None:
            await run(None)
        else:
            async with cluster(tiny_llama, tmp_path, layers) as (topology, _):
                await run(topology)

    asyncio.run(main())
