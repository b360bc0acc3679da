"""Medians, spreads and within-round ratios of repeated measurements."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratios(values: Sequence[float], baseline: Sequence[float]) -> dict[str, float]:
    """The spread of value / baseline, each pair measured in the same round, and best / best.

    Load from other processes only ever slows a run down, so the best rounds are the least
    disturbed ones: `best` is a cross-check on the median when a round was hit by a burst.
    """
    return {
        **spread([v / b for v, b in zip(values, baseline, strict=True)]),
        "best": max(values) / max(baseline),
    }
