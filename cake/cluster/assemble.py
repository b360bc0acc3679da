"""The master's side of `--workers` and `--discover`: which empty workers make the cluster, and
what becomes of it (a plan to run on, a plan to print, a plan to make again after a loss).

    workers named with --workers, plus those --discover finds (--min-workers of them at least)
    -> measure, place, push, assign (cake/cluster/setup.py)
    -> the plan as topology.yml (what --plan prints), its Topology, and the Replanning the
       master keeps: a worker lost for good is planned around over the workers that answer
       then (with --discover, found again).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cake.cluster.setup import ClusterOptions, plan_yaml, prepare_cluster, replanning
from cake.engine.pipeline import Replanning
from cake.topology import Topology
from cake.wire.discovery import discover

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Discovery:
    """--discover's settings: how long to listen, how many workers to wait for, on which port."""

    timeout: float
    min_workers: int | None
    port: int

    async def addresses(self, key: bytes, at_least: int | None = None) -> list[str]:
        found = await discover(key, self.timeout, at_least, port=self.port)
        log.info("discovery found %d worker(s): %s", len(found), ", ".join(f.name for f in found))
        if at_least and len(found) < at_least:
            raise ValueError(
                f"--discover found {len(found)} worker(s) within {self.timeout:g}s, "
                f"--min-workers is {at_least}; start more empty workers with the same "
                "--cluster-key, or raise --discovery-timeout"
            )
        return [f.address for f in found]


@dataclass(frozen=True)
class AssembledCluster:
    plan_yaml: str  # the plan as topology.yml, with the prediction on top (--plan prints it)
    topology: Topology | None  # None: every block runs on the master
    replanning: Replanning  # what the master does when a worker is lost for good


async def assemble_cluster(
    model: str, options: ClusterOptions, discovery: Discovery | None, plan_only: bool = False
) -> AssembledCluster:
    """Measure the named and discovered workers, place the blocks, and unless `plan_only` push
    and assign them."""
    if discovery is not None:
        found = await discovery.addresses(options.cluster_key, discovery.min_workers)
        options.workers += [address for address in found if address not in options.workers]
    plan = await prepare_cluster(model, options, plan_only=plan_only)
    rediscover = _rediscovery(discovery, options.cluster_key) if discovery else None
    topology = plan.topology if plan.topology.nodes else None
    return AssembledCluster(plan_yaml(plan), topology, replanning(model, options, rediscover))


def _rediscovery(discovery: Discovery, key: bytes) -> Callable[[], Awaitable[list[str]]]:
    """--discover again, for a re-plan: the addresses of the workers that answer now."""

    async def rediscover() -> list[str]:
        return await discovery.addresses(key)

    return rediscover
