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
4. the epoch moves on: every session notices before its next step and runs the steps it had
   run again on the new stages (`ResumableSteps`): the prompt as it went, then each generated
   token as its own step, so the KV caches it rebuilds are the ones it had bit for bit
   (quantized kernels round a many-row product differently from one row, and a single
   re-prefill of the whole history flipped a greedy near-tie 80 tokens later); then it
   carries on from where it was. That costs as many steps as the session had run.

One re-plan serves every session that failed with the same loss (a lock and the epoch). A
re-plan that fails (no worker left and the master cannot hold the model, say) fails the
sessions that waited for it, with its reason; the next request tries again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from cake.errors import StagesReplaced, WorkerError, WorkerGone
from cake.topology import Topology, format_blocks

if TYPE_CHECKING:
    import torch

    from cake.master import GenerationStats, Master

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
                "re-planned: %s; sessions in progress run their steps again on the new stages",
                placed or "every block on the master",
            )


class NextLogits(Protocol):
    async def __call__(
        self, session_id: str, token_ids: Sequence[int], start_pos: int, stats: GenerationStats
    ) -> torch.Tensor: ...


class ResumableSteps:
    """One generation's steps through the stages, recorded (how many tokens each fed) so that
    after a re-plan they run again on the new stages exactly as they ran."""

    def __init__(
        self,
        master: Master,
        session_id: str,
        history: list[int],
        next_logits: NextLogits,
        stats: GenerationStats,
    ) -> None:
        self.master = master
        self.session_id = session_id
        self.history = history  # the session's tokens; the caches hold the first sum(runs)
        self.next_logits = next_logits
        self.stats = stats
        self.runs: list[int] = []
        self.epoch = master.stage_epoch

    @property
    def stale(self) -> bool:
        """The stages were re-planned since this session's last step."""
        return self.epoch != self.master.stage_epoch

    async def step(self, tokens: Sequence[int], start_pos: int) -> torch.Tensor:
        """Logits after `tokens` at start_pos.. (see Master._logits); on stages re-planned since
        the last step, the session's earlier steps run there first."""
        for _ in range(MAX_RESUMES + 1):
            try:
                if self.stale:
                    self.epoch = self.master.stage_epoch
                    await self._run_again()
                logits = await self.next_logits(self.session_id, tokens, start_pos, self.stats)
                self.runs.append(len(tokens))
                return logits
            except (WorkerGone, StagesReplaced) as exc:
                await self.recover(exc)
        raise WorkerError(f"gave up after {MAX_RESUMES} re-plans in one step")

    def ran(self, count: int) -> None:
        """A step taken elsewhere (a speculation round) left `count` more positions cached."""
        self.runs.append(count)

    async def recover(self, cause: WorkerError) -> None:
        await self.master.recover(cause, self.epoch)

    async def _run_again(self) -> None:
        position = 0
        for count in self.runs:
            tokens = self.history[position : position + count]
            await self.next_logits(self.session_id, tokens, position, self.stats)
            position += count
