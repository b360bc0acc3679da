"""Re-planning when a worker is lost for good, in a cluster the master planned itself.

A worker that does not come back within --retry-timeout fails the requests that need it with
`WorkerGone`. With a hand-written topology that ends those generations, with that error. With
a cluster from --workers or --discover, the master plans around the loss instead:

1. it retires every stage: requests in flight end with `StagesReplaced`, worker connections
   close (so the surviving workers are free to take a new assignment), its own caches go;
2. it measures the workers that still answer and places the blocks again
   (`cluster_setup.prepare_cluster` with unreachable workers skipped; blocks may land on the
   master), pushes each worker what it lacks, and assigns;
3. it connects the new stages (`Master.use_topology`), loading any block it now runs itself;
4. the epoch moves on: every session notices before its next step and runs its whole token
   history (prompt and generated tokens) through the new stages, which rebuilds the KV caches
   it had, then carries on from where it was.

One re-plan serves every session that failed with the same loss (a lock and the epoch). A
re-plan that fails (no worker left and the master cannot hold the model, say) fails the
sessions that waited for it, with its reason; the next request tries again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cake.errors import WorkerError
from cake.topology import Topology, format_blocks

if TYPE_CHECKING:
    from cake.master import Master

log = logging.getLogger(__name__)

MAX_RESUMES = 3  # re-plans one step may wait for before it gives up (each lost another worker)


@dataclass
class Replanning:
    """What a master needs to plan again: `plan()` measures the workers that still answer,
    places the blocks, pushes and assigns, and returns the new topology."""

    plan: Callable[[], Awaitable[Topology]]
    epoch: int = 0  # re-plans so far
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def recover(self, master: Master, cause: WorkerError, epoch: int) -> None:
        """Re-plan, unless another session did since its stages of `epoch` failed."""
        async with self.lock:
            if self.epoch != epoch:
                return
            log.warning("%s; planning again over the workers that still answer", cause)
            await master.retire_stages()
            topology = await self.plan()
            await master.use_topology(topology)
            self.epoch += 1
            placed = "; ".join(
                f"{node.name}: blocks {format_blocks(node.blocks)}" for node in topology.nodes
            )
            log.warning(
                "re-planned: %s; sessions in progress re-run their tokens on the new stages",
                placed or "every block on the master",
            )
