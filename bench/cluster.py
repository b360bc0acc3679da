"""Topologies for the benchmark: blocks split evenly over N workers, none on the master."""

from __future__ import annotations

from pathlib import Path

import yaml


def even_split(n_layers: int, n_workers: int) -> list[range]:
    """Consecutive, near-equal runs of blocks, one per worker (the first ones get any extra)."""
    bounds = [round(i * n_layers / n_workers) for i in range(n_workers + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(n_workers)]


def write_topology(path: Path, n_layers: int, hosts: list[str]) -> dict[str, range]:
    """topology.yml with worker `w{i}` at hosts[i-1]; returns worker name -> its blocks."""
    runs = even_split(n_layers, len(hosts))
    names = [f"w{i}" for i in range(1, len(hosts) + 1)]
    spec = {
        name: {"host": host, "layers": [f"model.layers.{run.start}-{run.stop - 1}"]}
        for name, host, run in zip(names, hosts, runs, strict=True)
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return dict(zip(names, runs, strict=True))


def even_layers(n_layers: int, n_workers: int) -> dict[str, range]:
    """Worker name `w{i}` -> its blocks, split evenly (for cake.cluster.local_cluster's port-0
    start)."""
    return {f"w{i}": run for i, run in enumerate(even_split(n_layers, n_workers), start=1)}


def topology_entries(split: dict[str, range]) -> dict[str, list[str]]:
    return {name: [f"model.layers.{run.start}-{run.stop - 1}"] for name, run in split.items()}
