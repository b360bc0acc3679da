"""WorkerClient.is_up, the one answer to "is this worker's link up?", through a connection's
life: not yet connected, up, dropped by the worker, reconnected, closed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch
from cluster import cluster

from cake.errors import WorkerLost
from cake.model.config import LlamaConfig, architecture_of
from cake.topology import load_topology
from cake.wire.protocol import fingerprint_config
from cake.wire.worker_link import WorkerClient


def test_is_up_follows_the_link(tiny_llama: Path, tmp_path: Path) -> None:
    config = LlamaConfig.from_folder(tiny_llama)
    fingerprint = fingerprint_config(architecture_of(config))
    hidden = torch.zeros(1, 1, config.hidden_size)

    async def run() -> None:
        async with cluster(tiny_llama, tmp_path, {"w1": ["model.layers.0-1"]}) as (topology, w):
            client = WorkerClient(load_topology(topology).node("w1"), fingerprint)
            assert not client.is_up  # not connected yet
            await client.connect()
            assert client.is_up
            await client.forward("s", 0, range(0, 2), hidden)
            for link in list(w["w1"].links):  # the worker drops the connection
                link.close()
            with pytest.raises(WorkerLost):
                await client.forward("s", 1, range(0, 2), hidden)
            assert not client.is_up
            await client.ensure_connected(deadline=time.monotonic() + 30)
            assert client.is_up
            await client.close()
            assert not client.is_up

    asyncio.run(run())
