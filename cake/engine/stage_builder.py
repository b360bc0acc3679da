"""From a topology to the master's stages: connect the workers, check them, and run every block
no worker serves on a part of the model the master holds.

`Master.open` builds its first stages here (`StageBuilder.build`), and a re-plan
(cake/engine/pipeline.py) builds the next ones with the same builder (`rebuild`), so both read
the same: workers first (an unreachable or mismatched one fails in seconds, before a possibly
long load), then the blocks the master must run itself, each part with its own session store.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cake.engine.block_runner import BlockRunner
from cake.engine.compute import MasterCompute
from cake.engine.remote_stage import RemoteStage
from cake.engine.session_store import SessionStore, check_worker_limits, kv_budget
from cake.engine.stages import LocalStage, Stage
from cake.model.llama import Llama
from cake.model.opener import Compute, OpenedModel
from cake.topology import Run, Topology, format_blocks
from cake.wire.liveness import LivenessSettings
from cake.wire.worker_link import WorkerClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSettings:
    """How this master talks to workers and runs its own blocks; fixed when it opens."""

    model: OpenedModel
    compute: Compute  # where and how the master's own blocks run
    fingerprint: str  # of the model's architecture: a worker must serve the same
    max_frame_bytes: int  # after the handshake: a session's largest frame
    connect_timeout: float
    retry_timeout: float
    cluster_key: bytes | None
    tls: ssl.SSLContext | None
    liveness: LivenessSettings | None
    kv_memory: str | None  # --kv-memory of the master's stores


class StageBuilder:
    def __init__(self, settings: StageSettings, compute: MasterCompute) -> None:
        self.settings = settings
        self.compute = compute  # where the master's own tensor work runs
        # The master's own parts (its first, and any a re-plan added), each a model part with
        # the store of its sessions' caches.
        self.parts: list[BlockRunner] = []

    async def build(
        self, runs: Sequence[Run], load_master: Callable[[list[int]], Llama]
    ) -> list[Stage]:
        """The first stages: connect the workers, then `load_master(blocks)` the master's own
        part (its ends and every block no worker serves), which becomes the first local part."""
        clients = await self._connect(runs)
        try:
            blocks = _master_blocks(runs)
            part = load_master(blocks)
            store = self._store(part, blocks)
            if blocks:
                store.check_fits_one_session()
        except BaseException:
            await _close(clients)
            raise
        self.parts.append(BlockRunner(part, store))
        return self._stages(runs, clients)

    async def rebuild(self, topology: Topology) -> list[Stage]:
        """Stages for a new plan: connect its workers, load the blocks it gives the master
        that no part holds yet."""
        runs = topology.runs(self.settings.model.config.n_layers)
        clients = await self._connect(runs)
        held = {block for part in self.parts for block in part.model.blocks}
        missing = [block for block in _master_blocks(runs) if block not in held]
        if missing:
            try:
                self.parts.append(await asyncio.to_thread(self._load_part, missing))
            except BaseException:
                await _close(clients)
                raise
        return self._stages(runs, clients)

    async def _connect(self, runs: Sequence[Run]) -> dict[str, WorkerClient]:
        """A connected, checked client per worker the runs name; all closed if any fails."""
        settings = self.settings
        clients = {
            run.node.name: WorkerClient(
                run.node,
                settings.fingerprint,
                connect_timeout=settings.connect_timeout,
                retry_timeout=settings.retry_timeout,
                cluster_key=settings.cluster_key,
                tls=settings.tls,
                liveness=settings.liveness,
                max_frame_bytes=settings.max_frame_bytes,
            )
            for run in runs
            if run.node is not None
        }
        try:
            outcomes = await asyncio.gather(
                *(client.connect_when_ready() for client in clients.values()),
                return_exceptions=True,
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            context = settings.compute.max_seq_len
            for client in clients.values():
                assert client.welcome is not None
                check_worker_limits(client.label, client.welcome, settings.model.config, context)
        except BaseException:
            await _close(clients)
            raise
        return clients

    def _load_part(self, blocks: Sequence[int]) -> BlockRunner:
        """Blocks the master did not hold (a re-plan gave them to it), with a store of their
        own."""
        log.info("master: loading blocks %s it now runs", format_blocks(list(blocks)))
        model = self.settings.model.load(self.settings.compute, blocks)
        store = self._store(model, blocks)
        store.check_fits_one_session()
        return BlockRunner(model, store)

    def _store(self, model: Llama, blocks: Sequence[int]) -> SessionStore:
        """The KV caches of the master's `blocks` on `model` (budget measured now: after the
        weights are loaded)."""
        compute = self.settings.compute
        return SessionStore(
            model,
            list(blocks),
            compute.max_seq_len,
            kv_budget(self.settings.kv_memory, compute.device),
            owner="the master",
        )

    def _stages(self, runs: Sequence[Run], clients: dict[str, WorkerClient]) -> list[Stage]:
        """One stage per run; a local run is cut where the part that holds its blocks changes
        (the first part holding a block runs it)."""
        stages: list[Stage] = []
        for run in runs:
            if run.node is not None:
                stages.append(RemoteStage(clients[run.node.name], run.blocks))
                continue
            start = run.start
            while start < run.stop:
                part = self._owner_of(start)
                stop = start + 1
                while stop < run.stop and self._owner_of(stop) is part:
                    stop += 1
                stages.append(LocalStage(part, range(start, stop), self.compute))
                start = stop
        return stages

    def _owner_of(self, block: int) -> BlockRunner:
        for part in self.parts:
            if block in part.model.blocks:
                return part
        raise ValueError(f"block {block} is on no part of the master")


def _master_blocks(runs: Sequence[Run]) -> list[int]:
    return [block for run in runs if run.node is None for block in run.blocks]


async def _close(clients: dict[str, WorkerClient]) -> None:
    await asyncio.gather(*(client.close() for client in clients.values()))
