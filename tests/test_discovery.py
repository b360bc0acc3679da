"""Discovery over UDP broadcast in network namespaces this test creates (never a real network).

Two namespaces joined by a veth pair: the master probes from one; in the other run an empty
worker with our cluster key, one with another key, and a forger that answers every probe with a
made-up worker. Only the first may be found.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest

from cake.cluster.local_cluster import WorkerProcess
from cake.topology import parse_topology
from cake.wire.discovery import (
    Found,
    announcement,
    check_announcement,
    check_probe,
    discover,
    probe,
)

KEY = "discovery-test-key"
SUBNET = "10.231.77"
UDP_PORT = 10129


def test_probe_and_answer_need_the_key() -> None:
    nonce = os.urandom(32)
    assert check_probe(b"k", probe(b"k", nonce)) == nonce
    assert check_probe(b"other", probe(b"k", nonce)) is None
    answer = announcement(b"k", nonce, "w1", 10128)
    assert check_announcement(b"k", nonce, answer) == ("w1", 10128)
    assert check_announcement(b"other", nonce, answer) is None
    assert check_announcement(b"k", os.urandom(32), answer) is None  # a replayed old answer
    assert check_announcement(b"k", nonce, b"\xff" * 40) is None
    assert check_probe(b"k", b"") is None


class Answerer(asyncio.DatagramProtocol):
    """A UDP peer on loopback that answers each probe with the datagrams `answers(nonce)`: what
    workers, replayers and forgers send back. Counts the probes it answered."""

    def __init__(self, answers: Callable[[bytes], list[bytes]]) -> None:
        self.answers, self.answered = answers, 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        nonce = check_probe(KEY.encode(), data)
        assert nonce is not None and self.transport is not None
        for answer in self.answers(nonce):
            self.transport.sendto(answer, addr)
        self.answered += 1


def _tampered(datagram: bytes, **changes: object) -> bytes:
    """An announcement with fields changed after its MAC was made."""
    return msgpack.packb({**msgpack.unpackb(datagram), **changes})


def test_discover_refuses_replayed_and_forged_announcements() -> None:
    """discover() itself, on loopback. A worker's announcement is captured in one round; in the
    next, every probe is answered with that announcement again (a replay: right key, old
    nonce), one made with a guessed key, ones whose name or port was changed under the MAC, and
    one honest answer. Only the honest worker is found."""
    key = KEY.encode()

    async def discover_from(answers: Callable[[bytes], list[bytes]], **kw: object):  # type: ignore[no-untyped-def]
        transport, answerer = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: Answerer(answers), local_addr=("127.0.0.1", 0)
        )
        port = transport.get_extra_info("sockname")[1]
        try:
            found = await discover(key, port=port, targets=["127.0.0.1"], **kw)  # type: ignore[arg-type]
        finally:
            transport.close()
        return found, answerer.answered

    captured: list[bytes] = []

    def honest(nonce: bytes) -> list[bytes]:
        captured.append(announcement(key, nonce, "w1", 10128))
        return captured[-1:]

    def replayed_forged_and_honest(nonce: bytes) -> list[bytes]:
        made = announcement(key, nonce, "w3", 10300)
        return [
            captured[0],
            announcement(b"a guessed key", nonce, "evil", 6666),
            _tampered(made, name="w4"),
            _tampered(made, port=10400),
            announcement(key, nonce, "w2", 10200),
        ]

    first, _ = asyncio.run(discover_from(honest, timeout=10, min_workers=1))
    assert first == [Found("w1", "127.0.0.1", 10128)]
    # min_workers=2: were any wrong answer taken, discover() would stop early with two.
    found, answered = asyncio.run(
        discover_from(replayed_forged_and_honest, timeout=1, min_workers=2)
    )
    assert answered >= 1  # the wrong answers did reach discover()
    assert found == [Found("w2", "127.0.0.1", 10200)]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    tag = uuid.uuid4().hex[:6]
    master, workers = f"cake-m-{tag}", f"cake-w-{tag}"
    try:
        _ip("netns", "add", master)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot create a network namespace here (needs root and iproute2): {exc}")
    try:
        _ip("netns", "add", workers)
        _ip("link", "add", f"vm{tag}", "type", "veth", "peer", "name", f"vw{tag}")
        _ip("link", "set", f"vm{tag}", "netns", master)
        _ip("link", "set", f"vw{tag}", "netns", workers)
        _ip("-n", master, "addr", "add", f"{SUBNET}.1/24", "brd", "+", "dev", f"vm{tag}")
        _ip("-n", workers, "addr", "add", f"{SUBNET}.2/24", "brd", "+", "dev", f"vw{tag}")
        for ns, dev in ((master, f"vm{tag}"), (workers, f"vw{tag}")):
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield master, workers
    finally:
        for ns in (master, workers):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


FORGER = f"""
import socket, sys
from cake.wire.discovery import announcement, _decode
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("0.0.0.0", {UDP_PORT}))
print("serving blocks forged on 0.0.0.0:{UDP_PORT}", file=sys.stderr, flush=True)
while True:
    data, addr = sock.recvfrom(2048)
    message = _decode(data, "cake-discover")
    if message is not None:  # echo the nonce, sign with a key it guessed
        sock.sendto(announcement(b"guess", message["nonce"], "evil", 6666), addr)
"""


def _in(ns: str, name: str, args: list[str]) -> WorkerProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = WorkerProcess(name, ["ip", "netns", "exec", ns, *args], env)
    process.wait_ready(60)
    return process


def _empty_worker(key: str, cache: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cake.cli",
        "--mode",
        "worker",
        "--cluster-key",
        key,
        "--address",
        f"{SUBNET}.2:0",
        "--device",
        "cpu",
        "--discovery-port",
        str(UDP_PORT),
        "--cache-dir",
        "/nonexistent-unused"
        if False
        else os.path.join(os.environ.get("TMPDIR", "/tmp"), "cake-d"),
    ]


@pytest.mark.slow
def test_discovery_finds_only_workers_with_our_key(
    namespaces: tuple[str, str], tmp_path: Path, tiny_llama: Path
) -> None:
    master_ns, workers_ns = namespaces
    processes = []
    try:
        good = _in(workers_ns, "good", _empty_worker(KEY, tmp_path / "good"))
        processes.append(good)
        processes.append(
            _in(workers_ns, "other key", _empty_worker("not-our-key", tmp_path / "other"))
        )
        processes.append(_in(workers_ns, "forger", [sys.executable, "-c", FORGER]))
        # The master command: discover for 3 s (so every wrong answer had its chance), then
        # measure what it found over the authenticated connection and print the plan.
        master = [
            *("ip", "netns", "exec", master_ns, sys.executable, "-m", "cake.cli"),
            *("--model", str(tiny_llama), "--cluster-key", KEY, "--device", "cpu"),
            *("--discover", "--discovery-timeout", "3", "--discovery-port", str(UDP_PORT)),
            *("--plan", "--master-blocks", "0", "--max-seq-len", "64"),
        ]
        result = subprocess.run(master, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "discovery found 1 worker(s)" in result.stderr
        plan = parse_topology(result.stdout)
        name = f"{SUBNET}.2:{good.port}"
        assert [(n.name, n.host, n.port, n.blocks) for n in plan.nodes] == [
            (name, f"{SUBNET}.2", good.port, (0, 1, 2, 3))
        ]
    finally:
        for process in processes:
            process.stop()
