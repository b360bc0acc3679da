"""The planner on synthetic measurements: exact against brute force, memory caps, slow workers."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cake.cluster.placement import (
    MASTER,
    PlacementError,
    StageCost,
    cost_of_ranges,
    keep_or_replace,
    objective,
    place,
)


def _brute_force(stages: list[StageCost], n_layers: int) -> float:
    best = float("inf")
    for counts in itertools.product(*(range(min(s.capacity, n_layers) + 1) for s in stages)):
        if sum(counts) == n_layers:
            best = min(best, objective(stages, counts))
    return best


def _random_stages(rng: random.Random, count: int, n_layers: int) -> list[StageCost]:
    stages = [
        StageCost(f"w{i}", rng.uniform(0.2, 5.0), rng.uniform(0.05, 6.0), rng.randint(0, n_layers))
        for i in range(count)
    ]
    return [StageCost(MASTER, rng.uniform(0.2, 5.0), 0.0, rng.randint(0, n_layers)), *stages]


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force_on_small_cases(seed: int) -> None:
    rng = random.Random(seed)
    n_layers = rng.randint(1, 9)
    stages = _random_stages(rng, rng.randint(1, 3), n_layers)
    if sum(min(s.capacity, n_layers) for s in stages) < n_layers:
        with pytest.raises(PlacementError, match="do not fit"):
            place(stages, n_layers)
        return
    plan = place(stages, n_layers)
    assert sum(plan.counts) == n_layers
    assert plan.cost_ms == pytest.approx(_brute_force(stages, n_layers))
    for stage, count in zip(stages, plan.counts, strict=True):
        assert count <= stage.capacity  # memory caps are never exceeded


def test_slow_worker_gets_fewer_blocks() -> None:
    fast = StageCost("fast", block_ms=1.0, rtt_ms=0.5, capacity=32)
    slow = StageCost("slow", block_ms=3.0, rtt_ms=0.5, capacity=32)
    master = StageCost(MASTER, block_ms=1.0, rtt_ms=0.0, capacity=0)
    plan = place([master, fast, slow], 32)
    counts = dict(zip(["master", "fast", "slow"], plan.counts, strict=True))
    assert counts["slow"] < counts["fast"]
    assert counts == {"master": 0, "fast": 24, "slow": 8}  # 24 x 1 ms == 8 x 3 ms


def test_memory_caps_bind() -> None:
    big = StageCost("big", block_ms=1.0, rtt_ms=1.0, capacity=10)
    tiny = StageCost("tiny", block_ms=0.1, rtt_ms=1.0, capacity=2)
    master = StageCost(MASTER, block_ms=5.0, rtt_ms=0.0, capacity=4)
    plan = place([master, big, tiny], 16)
    assert plan.counts == (4, 10, 2)
    with pytest.raises(PlacementError, match=r"16 blocks do not fit.*room for 15"):
        place([master, big, StageCost("tiny", 0.1, 1.0, 1)], 16)


def test_a_hop_that_costs_more_than_it_saves_is_not_used() -> None:
    master = StageCost(MASTER, block_ms=1.0, rtt_ms=0.0, capacity=8)
    far = StageCost("far", block_ms=1.0, rtt_ms=50.0, capacity=8)
    plan = place([master, far], 8)
    assert plan.counts == (8, 0)
    assert [stage.name for stage, _ in plan.ranges] == [MASTER]


def test_ranges_are_contiguous_workers_first() -> None:
    stages = [
        StageCost(MASTER, block_ms=1.0, rtt_ms=0.0, capacity=2),
        StageCost("a", block_ms=1.0, rtt_ms=0.1, capacity=3),
        StageCost("b", block_ms=1.0, rtt_ms=0.1, capacity=3),
    ]
    plan = place(stages, 8)
    ranges = [(stage.name, (r.start, r.stop)) for stage, r in plan.ranges]
    assert ranges == [("a", (0, 3)), ("b", (3, 6)), (MASTER, (6, 8))]
    assert plan.step_ms == pytest.approx(8 * 1.0 + 0.2)
    assert plan.tokens_per_s == pytest.approx(1000 / 8.2)
    assert "predicted decode" in plan.describe()


def test_larger_random_cases_are_fast_and_valid() -> None:
    rng = random.Random(7)
    stages = _random_stages(rng, 16, 126)
    stages = [StageCost(s.name, s.block_ms, s.rtt_ms, 126) for s in stages]
    plan = place(stages, 126)
    assert sum(plan.counts) == 126


def test_current_ranges_are_costed_and_checked() -> None:
    from cake.cluster.placement import cost_of_ranges

    stages = [
        StageCost(MASTER, block_ms=1.0, rtt_ms=0.0, capacity=2),
        StageCost("a", block_ms=1.0, rtt_ms=0.5, capacity=4),
        StageCost("b", block_ms=2.0, rtt_ms=0.5, capacity=4),
    ]
    # a: 0-3 (4 ms), b: 4-5 (4 ms), master: 6-7 (2 ms) -> 4 + 0.5 + 0.5
    assert cost_of_ranges(stages, 8, {"a": range(0, 4), "b": range(4, 6)}) == 5.0
    assert cost_of_ranges(stages, 8, {"a": range(0, 4), "b": range(3, 6)}) is None  # overlap
    assert cost_of_ranges(stages, 8, {"a": range(0, 5)}) is None  # over a's capacity
    assert cost_of_ranges(stages, 8, {"b": range(0, 2)}) is None  # master cannot take 6
    assert cost_of_ranges(stages, 8, {"gone": range(0, 4)}) is None  # worker not measured


def test_what_the_workers_hold_is_kept_unless_clearly_worse() -> None:
    from cake.cluster.placement import keep_or_replace

    def stages(b_ms: float) -> list[StageCost]:
        return [
            StageCost(MASTER, block_ms=1.0, rtt_ms=0.0, capacity=0),
            StageCost("a", block_ms=1.0, rtt_ms=0.5, capacity=8),
            StageCost("b", block_ms=b_ms, rtt_ms=0.5, capacity=8),
        ]

    held = {"a": range(0, 4), "b": range(4, 8)}
    # b measured 30% slower this time: the best plan moves a block, but 4/4 is within 20%.
    best = place(stages(1.3), 8)
    assert best.counts != (0, 4, 4)
    ranges, kept = keep_or_replace(stages(1.3), 8, best, held)
    assert ranges == held and kept == pytest.approx(4 * 1.3 + 1.0)
    # b is now twice as slow: worth a push.
    best = place(stages(2.0), 8)
    ranges, kept = keep_or_replace(stages(2.0), 8, best, held)
    assert kept is None and len(ranges["b"]) < 4


@st.composite
def cluster_costs(draw: st.DrawFn) -> tuple[list[StageCost], int]:
    """A master and up to 6 workers with random block times, round trips and capacities."""
    n_layers = draw(st.integers(1, 40))
    times = st.floats(0.01, 50.0, allow_nan=False, allow_infinity=False)
    capacity = st.integers(0, n_layers + 3)
    workers = [
        StageCost(f"w{i}", draw(times), draw(st.floats(0.0, 20.0)), draw(capacity))
        for i in range(draw(st.integers(0, 6)))
    ]
    master = StageCost(MASTER, draw(times), 0.0, draw(capacity))
    stages = [master, *workers]
    # The master may come anywhere in the list: the plan still puts its blocks last.
    stages.insert(draw(st.integers(0, len(workers))), stages.pop(0))
    return stages, n_layers


@settings(max_examples=300, deadline=None)
@given(cluster_costs())
def test_every_placement_is_valid(case: tuple[list[StageCost], int]) -> None:
    """Whatever the costs: the ranges are contiguous, cover every block once and in order,
    workers in the order given and the master last, within every stage's capacity; the counts
    are the ranges' lengths; and the plan's cost is what cost_of_ranges says of its ranges."""
    stages, n_layers = case
    if sum(min(s.capacity, n_layers) for s in stages) < n_layers:
        with pytest.raises(PlacementError, match="do not fit"):
            place(stages, n_layers)
        return
    plan = place(stages, n_layers)
    assert len(plan.counts) == len(stages)
    covered = [block for _, blocks in plan.ranges for block in blocks]
    assert covered == list(range(n_layers))  # contiguous, every block once, in order
    for _, blocks in plan.ranges:
        assert len(blocks) >= 1 and blocks.step == 1
    for stage, count in zip(stages, plan.counts, strict=True):
        assert 0 <= count <= stage.capacity
        held = [blocks for s, blocks in plan.ranges if s is stage]
        assert [len(blocks) for blocks in held] == ([count] if count else [])
    names = [stage.name for stage, _ in plan.ranges]
    workers = [s.name for s in stages if s.name != MASTER]
    assert [n for n in names if n != MASTER] == [n for n in workers if n in names]
    assert MASTER not in names[:-1]  # the master's blocks, if any, come last
    worker_ranges = {stage.name: blocks for stage, blocks in plan.ranges if stage.name != MASTER}
    assert cost_of_ranges(stages, n_layers, worker_ranges) == pytest.approx(plan.cost_ms)
    # What keep_or_replace hands on is a valid plan too: the held ranges or the best ones.
    ranges, kept = keep_or_replace(stages, n_layers, plan, worker_ranges)
    assert (ranges, kept) == (worker_ranges, None)
