"""A worker listens while it loads its blocks: a master that connects meanwhile is told how far
the load is and waits while it moves; a wrong key or model is refused at once."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
import yaml

from cake.errors import WorkerError, WorkerLoading
from cake.host.network import listen_socket
from cake.model.config import architecture_of
from cake.model.loader import load_llama
from cake.topology import parse_topology
from cake.wire import loading, worker_link
from cake.wire.loading import LoadingListener, LoadProgress
from cake.wire.protocol import fingerprint_config
from cake.wire.worker_link import WorkerClient
from cake.worker import Worker


def client_for(port: int, fingerprint: str, connect_timeout: float = 10.0) -> WorkerClient:
    topology = {"w1": {"host": f"127.0.0.1:{port}", "layers": ["model.layers.0-3"]}}
    node = parse_topology(yaml.safe_dump(topology)).node("w1")
    return WorkerClient(node, fingerprint, connect_timeout=connect_timeout)


@pytest.fixture(scope="module")
def part(tiny_llama: Path):
    return load_llama(tiny_llama, range(4), max_seq_len=512)


@pytest.mark.slow  # waits for a load of four half-second blocks
def test_a_master_waits_for_a_loading_worker_and_logs_its_progress(
    part, caplog: pytest.LogCaptureFixture
) -> None:
    fingerprint = fingerprint_config(architecture_of(part.config))
    sock = listen_socket("127.0.0.1", 0, "--address")
    port = sock.getsockname()[1]
    progress = LoadProgress("blocks 0-3", 4)
    door = LoadingListener(sock, "w1", fingerprint, lambda: str(progress))

    async def main() -> tuple[object, int]:
        door.start()
        # One attempt: the refusal says how far the load is, and may be retried.
        with pytest.raises(WorkerLoading, match=r"w1 .* is loading blocks 0-3: 0 of 4 done"):
            await client_for(port, fingerprint).connect()
        client = client_for(port, fingerprint)
        waiting = asyncio.create_task(client.connect_when_ready())
        for _ in range(4):  # the blocks load, one by one
            await asyncio.sleep(0.6)
            progress.advance()
        await asyncio.to_thread(door.stop)
        worker = Worker("w1", part, max_seq_len=512)
        server = await worker.serve("127.0.0.1", port, sock=sock)
        try:
            welcome = await asyncio.wait_for(waiting, 10)
        finally:
            await client.close()
            server.close()
            worker.close()
        return welcome, door.answered

    with caplog.at_level(logging.INFO, logger="cake.wire.worker_link"):
        welcome, answered = asyncio.run(main())
    assert welcome.blocks == (0, 1, 2, 3)  # type: ignore[attr-defined]
    assert answered >= 4
    waits = [r.getMessage() for r in caplog.records if "waiting for it" in r.getMessage()]
    assert any("1 of 4 done" in w for w in waits) and any("3 of 4 done" in w for w in waits)


def test_a_load_without_progress_is_given_up_and_a_wrong_model_refused_at_once(part) -> None:
    fingerprint = fingerprint_config(architecture_of(part.config))
    sock = listen_socket("127.0.0.1", 0, "--address")
    port = sock.getsockname()[1]
    door = LoadingListener(sock, "w1", fingerprint, lambda: "loading blocks 0-3: 1 of 4 done")

    async def main() -> None:
        with pytest.raises(WorkerError, match="serves a different model"):
            await client_for(port, "0" * 16).connect_when_ready()
        with pytest.raises(WorkerError, match=r"with no progress for 1s \(--connect-timeout\)"):
            await client_for(port, fingerprint, connect_timeout=1).connect_when_ready()

    door.start()
    try:
        asyncio.run(main())
    finally:
        door.stop()
        sock.close()


def test_a_worker_that_is_not_listening_yet_is_tried_until_the_connect_timeout() -> None:
    sock = listen_socket("127.0.0.1", 0, "--address")
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now

    async def main() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(WorkerError, match="is the worker running"):
            await client_for(port, "0" * 16, connect_timeout=1).connect_when_ready()
        return loop.time() - started

    assert 1 <= asyncio.run(main()) < 5


def test_a_restarting_worker_is_used_the_moment_it_listens_and_the_moment_it_has_loaded(
    part, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The master's reconnection after a crash: every pause it could wait out (the backoff, the
    loading poll, the worker's hold) is an hour here, so it gets through only on the two signals
    it must act on at once: the port that refused now listens, and the loading worker closes
    the connection it held because its blocks are loaded."""
    for name in ("RECONNECT_FIRST_DELAY_S", "RECONNECT_MAX_DELAY_S", "LOADING_POLL_S"):
        monkeypatch.setattr(worker_link, name, 3600.0)
    monkeypatch.setattr(loading, "HANDSHAKE_TIMEOUT_S", 3600.0)
    fingerprint = fingerprint_config(architecture_of(part.config))
    closed = listen_socket("127.0.0.1", 0, "--address")
    port = closed.getsockname()[1]
    closed.close()  # the worker crashed: its port refuses

    async def main() -> int:
        client = client_for(port, fingerprint, connect_timeout=3600)
        reconnecting = asyncio.create_task(client.ensure_connected(time.monotonic() + 3600))
        await asyncio.sleep(0.2)  # refused meanwhile
        sock = listen_socket("127.0.0.1", port, "--address")  # the new process listens
        door = LoadingListener(sock, "w1", fingerprint, lambda: "loading blocks 0-3: 1 of 4 done")
        await asyncio.to_thread(door.start)
        try:  # hang guards, not timings: without the signals each wait lasts an hour
            await asyncio.wait_for(asked_while_loading(door), 60)
        finally:
            await asyncio.to_thread(door.stop)  # loaded
        worker = Worker("w1", part, max_seq_len=512)
        server = await worker.serve("127.0.0.1", port, sock=sock)
        try:
            await asyncio.wait_for(reconnecting, 60)
            assert client.is_up
        finally:
            await client.close()
            server.close()
            worker.close()
        return door.answered

    assert asyncio.run(main()) == 1  # asked once while loading, then waited on that connection


async def asked_while_loading(door: LoadingListener) -> None:
    while door.answered == 0:
        await asyncio.sleep(0.01)
