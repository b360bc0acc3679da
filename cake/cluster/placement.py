"""Measured placement: which contiguous range of blocks each stage serves.

Pure functions on measurements (no I/O, no torch), so the planner is tested on synthetic
numbers. A stage is the master or one worker; every decode step runs each used stage once, and
each used worker costs one round trip from the master and back.

The objective, as issue 15 puts it: minimise the slowest stage's compute plus the round trips,

    cost = max_i(n_i * block_ms_i) + sum over used workers of rtt_ms_i

with n_i <= capacity_i (what fits in that stage's free memory) and sum n_i = n_layers. The
slowest stage bounds throughput once steps are pipelined and keeps any one device from being the
bottleneck; the round-trip term stops the planner from spreading blocks over a worker whose hop
costs more than it saves. The predicted single-session decode rate is reported beside it:
1000 / (sum_i n_i * block_ms_i + sum rtt_ms_i + master_overhead_ms) tokens per second.

Since the master relays every hop, the order of the stages changes no cost: the plan gives the
workers their ranges in the order they were listed, and the master's blocks (if any) come last.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MASTER = "master"


@dataclass(frozen=True)
class StageCost:
    """What the planner knows about one stage."""

    name: str  # a worker's name, or MASTER
    block_ms: float  # measured time of one block per decoded token there
    rtt_ms: float  # one round trip from the master (0 for the master itself)
    capacity: int  # most blocks that fit in its free memory

    def __post_init__(self) -> None:
        if not self.block_ms > 0 or self.rtt_ms < 0 or self.capacity < 0:
            raise ValueError(f"bad measurements for stage {self.name!r}: {self}")


@dataclass(frozen=True)
class Placement:
    """Blocks per stage (same order as the stages given), and what the plan predicts."""

    stages: tuple[StageCost, ...]
    counts: tuple[int, ...]

    @property
    def ranges(self) -> list[tuple[StageCost, range]]:
        """Contiguous ranges: workers in the given order, then the master's blocks last."""
        order = sorted(range(len(self.stages)), key=lambda i: self.stages[i].name == MASTER)
        out, start = [], 0
        for i in order:
            if self.counts[i]:
                out.append((self.stages[i], range(start, start + self.counts[i])))
                start += self.counts[i]
        return out

    @property
    def cost_ms(self) -> float:
        return objective(self.stages, self.counts)

    @property
    def step_ms(self) -> float:
        """Predicted time of one decode step of one session (compute + round trips)."""
        return sum(n * s.block_ms + (s.rtt_ms if n else 0.0) for s, n in self._used())

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 / self.step_ms if self.step_ms else math.inf

    def _used(self) -> list[tuple[StageCost, int]]:
        return [(s, n) for s, n in zip(self.stages, self.counts, strict=True) if n]

    def describe(self) -> str:
        parts = [
            f"{stage.name}: blocks {r.start}-{r.stop - 1} ({len(r)} x {stage.block_ms:.2f} ms"
            f"{f' + {stage.rtt_ms:.2f} ms round trip' if stage.rtt_ms else ''})"
            for stage, r in self.ranges
        ]
        return (
            "; ".join(parts)
            + f" -> slowest stage + round trips {self.cost_ms:.2f} ms, predicted decode "
            f"{self.tokens_per_s:.1f} tok/s for one session"
        )


def objective(stages: Sequence[StageCost], counts: Sequence[int]) -> float:
    """max_i(n_i * block_ms_i) + sum of the used workers' round trips."""
    used = [(s, n) for s, n in zip(stages, counts, strict=True) if n]
    if not used:
        return 0.0
    return max(n * s.block_ms for s, n in used) + sum(s.rtt_ms for s, _ in used)


class PlacementError(ValueError):
    """No placement fits: the message says how much memory is missing."""


def place(stages: Sequence[StageCost], n_layers: int) -> Placement:
    """The counts that minimise `objective` under every stage's capacity (exact).

    For each candidate bottleneck T (some n * block_ms_i), stage i can take
    c_i(T) = min(capacity_i, floor(T / block_ms_i)) blocks; the cheapest set of stages whose
    c_i(T) cover n_layers is a small min-cost cover knapsack over round trips. The best
    T + round trips over all candidates is optimal, because an optimal plan's bottleneck is
    one of the candidates and its stages are a cover at that T. Ties go to the faster step.
    Cost: O(S^2 * L^2) for S stages and L blocks, well under a second for 16 workers x 126.
    """
    stages = tuple(stages)
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    if not stages:
        raise PlacementError("no stages to place blocks on")
    total = sum(min(s.capacity, n_layers) for s in stages)
    if total < n_layers:
        raise PlacementError(
            f"the model's {n_layers} blocks do not fit: the master and workers have room for "
            f"{total} ({', '.join(f'{s.name}: {s.capacity}' for s in stages)}); add workers "
            "or memory, or use a smaller dtype (--dtype f16/bf16)"
        )
    candidates = sorted({n * s.block_ms for s in stages for n in range(1, n_layers + 1)})
    best: Placement | None = None
    for bottleneck in candidates:
        if best is not None and bottleneck >= best.cost_ms:
            break  # the round trips only add: no larger bottleneck can win
        caps = [min(s.capacity, math.floor(bottleneck / s.block_ms + 1e-9)) for s in stages]
        chosen = _cheapest_cover(stages, caps, n_layers)
        if chosen is None:
            continue
        counts = _balance(stages, caps, chosen, n_layers)
        plan = Placement(stages, counts)
        if best is None or (plan.cost_ms, plan.step_ms) < (best.cost_ms, best.step_ms):
            best = plan
    assert best is not None  # the largest candidate lets every stage take its capacity
    return best


def _cheapest_cover(
    stages: Sequence[StageCost], caps: Sequence[int], n_layers: int
) -> list[int] | None:
    """Indices of the stages with the least total round trip whose caps sum to >= n_layers."""
    # cover[b] = (round trips, chosen stages) covering at least b blocks (b capped at n_layers)
    inf = (math.inf, [])
    cover: list[tuple[float, list[int]]] = [(0.0, [])] + [inf] * n_layers
    for i, (stage, cap) in enumerate(zip(stages, caps, strict=True)):
        if cap <= 0:
            continue
        for b in range(n_layers, 0, -1):  # descending: each stage used at most once
            before = cover[max(b - cap, 0)]
            cost = before[0] + stage.rtt_ms
            if cost < cover[b][0]:
                cover[b] = (cost, [*before[1], i])
    return cover[n_layers][1] if cover[n_layers][0] < math.inf else None


def _balance(
    stages: Sequence[StageCost], caps: Sequence[int], chosen: Sequence[int], n_layers: int
) -> tuple[int, ...]:
    """Fill the chosen stages block by block, each to the one that stays fastest (water fill),
    so the bottleneck is as low as these stages allow. A chosen stage may end up with none."""
    counts = [0] * len(stages)
    for _ in range(n_layers):
        room = [i for i in chosen if counts[i] < caps[i]]
        i = min(room, key=lambda j: ((counts[j] + 1) * stages[j].block_ms, stages[j].rtt_ms))
        counts[i] += 1
    return tuple(counts)


# A new plan must beat the one the workers already hold by this much to be worth pushing for:
# block timings move from run to run (a few percent on a quiet machine, far more beside other
# work), and a flapping plan would push tensors again each time.
KEEP_TOLERANCE = 0.20


def cost_of_ranges(
    stages: Sequence[StageCost], n_layers: int, ranges: dict[str, range]
) -> float | None:
    """The objective of given worker ranges (the master runs every other block), or None if
    they overlap, leave the model, or exceed a capacity."""
    by_name = {stage.name: stage for stage in stages}
    master = by_name.get(MASTER)
    taken: set[int] = set()
    counts: dict[str, int] = {}
    for name, blocks in ranges.items():
        stage = by_name.get(name)
        if stage is None or name == MASTER or not blocks or blocks.stop > n_layers:
            return None
        if taken & set(blocks) or len(blocks) > stage.capacity:
            return None
        taken |= set(blocks)
        counts[name] = len(blocks)
    rest = n_layers - len(taken)
    if rest:
        if master is None or rest > master.capacity:
            return None
        counts[MASTER] = rest
    used = [by_name[name] for name in counts]
    return objective(used, [counts[s.name] for s in used])


def keep_or_replace(
    stages: Sequence[StageCost], n_layers: int, best: Placement, held: dict[str, range]
) -> tuple[dict[str, range], float | None]:
    """The worker ranges to use: `held` (what the workers serve now) while its cost stays within
    KEEP_TOLERANCE of the best plan's, else the best plan's. Second: the kept cost, or None."""
    planned = {stage.name: blocks for stage, blocks in best.ranges if stage.name != MASTER}
    if not held or held == planned:
        return planned, None
    cost = cost_of_ranges(stages, n_layers, held)
    if cost is not None and cost <= best.cost_ms * (1 + KEEP_TOLERANCE):
        return dict(held), cost
    return planned, None
