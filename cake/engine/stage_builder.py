"""From a topology to the master's stages: connect the workers, check them, and run every block
no worker serves on a part of the model the master holds.

`Master.open` builds its first stages here, and a re-plan (cake/engine/replan.py) builds the next ones
with the same settings, so both read the same.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cake.engine.remote_stage import RemoteStage
from cake.engine.sessions import SessionStore, check_worker_limits, kv_budget
from cake.engine.stages import LocalStage, Stage
from cake.model.config import LlamaConfig
from cake.model.llama import Llama
from cake.model.loader import load_llama
from cake.model.quant import Quantization
from cake.topology import Run, format_blocks
from cake.wire.liveness import LivenessSettings
from cake.wire.worker_link import WorkerClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSettings:
    """How this master talks to workers and runs its own blocks; fixed when it opens."""

    fingerprint: str  # of the model's architecture: a worker must serve the same
    max_seq_len: int
    max_frame_bytes: int  # after the handshake: a session's largest frame
    connect_timeout: float
    retry_timeout: float
    cluster_key: bytes | None
    tls: ssl.SSLContext | None
    liveness: LivenessSettings | None
    offload: bool  # run the master's tensor work in a thread (HTTP API)
    device: torch.device  # where the master's own blocks run ...
    dtype: torch.dtype  # ... in this dtype
    quantization: Quantization | None
    kv_memory: str | None  # --kv-memory of the master's stores

    def load(
        self, folder: Path, config: LlamaConfig, blocks: Sequence[int], with_ends: bool = False
    ) -> Llama:
        """The master's own part: `blocks` (and with_ends, the embedding and the head)."""
        return load_llama(
            folder,
            blocks,
            with_embedding=with_ends,
            with_head=with_ends,
            dtype=self.dtype,
            device=self.device,
            max_seq_len=self.max_seq_len,
            config=config,
            quantization=self.quantization,
        )

    def store(self, model: Llama, blocks: Sequence[int]) -> SessionStore:
        """The KV caches of the master's `blocks` on `model` (budget measured now: after the
        weights are loaded)."""
        return SessionStore(
            model,
            list(blocks),
            self.max_seq_len,
            kv_budget(self.kv_memory, self.device),
            owner="the master",
        )


async def connect_workers(
    runs: Sequence[Run], config: LlamaConfig, settings: StageSettings
) -> dict[str, WorkerClient]:
    """A connected, checked client per worker the runs name; all closed if any fails."""
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
            *(client.connect() for client in clients.values()), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        for client in clients.values():
            assert client.welcome is not None
            check_worker_limits(client.label, client.welcome, config, settings.max_seq_len)
    except BaseException:
        await asyncio.gather(*(client.close() for client in clients.values()))
        raise
    return clients


@dataclass(frozen=True)
class LocalPart:
    """Blocks the master holds, and the store of their sessions' KV caches."""

    model: Llama
    store: SessionStore


def build_stages(
    runs: Sequence[Run],
    clients: dict[str, WorkerClient],
    parts: Sequence[LocalPart],
    offload: bool,
) -> list[Stage]:
    """One stage per run; a local run is cut where the part that holds its blocks changes (the
    first part holding a block runs it)."""
    stages: list[Stage] = []
    for run in runs:
        if run.node is not None:
            stages.append(RemoteStage(clients[run.node.name], run.blocks))
            continue
        start = run.start
        while start < run.stop:
            part = owner_of(start, parts)
            stop = start + 1
            while stop < run.stop and owner_of(stop, parts) is part:
                stop += 1
            stages.append(LocalStage(part.model, range(start, stop), part.store, offload=offload))
            start = stop
    return stages


def owner_of(block: int, parts: Sequence[LocalPart]) -> LocalPart:
    for part in parts:
        if block in part.model.blocks:
            return part
    raise ValueError(f"block {block} is on no part of the master")


def missing_blocks(runs: Sequence[Run], parts: Sequence[LocalPart]) -> list[int]:
    """Blocks the runs give the master that none of its parts holds yet."""
    held = {block for part in parts for block in part.model.blocks}
    return [b for run in runs if run.node is None for b in run.blocks if b not in held]


def load_local_part(
    folder: Path, config: LlamaConfig, blocks: Sequence[int], settings: StageSettings
) -> LocalPart:
    """Blocks the master did not hold (a re-plan gave them to it), with a store of their own."""
    log.info("master: loading blocks %s it now runs", format_blocks(list(blocks)))
    model = settings.load(folder, config, blocks)
    store = settings.store(model, blocks)
    store.check_fits_one_session()
    return LocalPart(model, store)
