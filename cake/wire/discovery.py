"""LAN discovery of empty workers by UDP broadcast, authenticated with the cluster key.

    master -> broadcast  {"t": "cake-discover", "v": 1, "nonce": N, "mac": HMAC(key, "discover" N)}
    worker -> master     {"t": "cake-here", "v": 1, "nonce": N, "name": str, "port": int,
                          "mac": HMAC(key, "announce" N name port)}

A worker answers only a probe whose MAC checks out with its own key (so strangers cannot make it
talk, and workers of other clusters stay silent), and the master keeps only answers whose MAC
covers its own fresh nonce (so nobody without the key can inject a worker, and an old answer
cannot be replayed). The worker's host is the datagram's source address. Discovery only finds
candidates: the master then connects to each with the full cluster-key handshake (over TLS when
configured) before it trusts it with anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass

import msgpack

log = logging.getLogger(__name__)

DEFAULT_DISCOVERY_PORT = 10129
MAX_DATAGRAM = 1024
PROBE_INTERVAL_S = 0.5
_VERSION = 1
_SIOCGIFBRDADDR = 0x8919  # Linux ioctl: an interface's IPv4 broadcast address


@dataclass(frozen=True)
class Found:
    """A worker that proved it knows the cluster key."""

    name: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _mac(key: bytes, role: str, *parts: bytes) -> bytes:
    return hmac.new(key, b"\0".join([role.encode(), *parts]), hashlib.sha256).digest()


def probe(key: bytes, nonce: bytes) -> bytes:
    return msgpack.packb(
        {"t": "cake-discover", "v": _VERSION, "nonce": nonce, "mac": _mac(key, "discover", nonce)}
    )


def announcement(key: bytes, nonce: bytes, name: str, port: int) -> bytes:
    mac = _mac(key, "announce", nonce, name.encode(), str(port).encode())
    return msgpack.packb(
        {"t": "cake-here", "v": _VERSION, "nonce": nonce, "name": name, "port": port, "mac": mac}
    )


def _decode(datagram: bytes, kind: str) -> dict | None:
    """The datagram as a map of the given kind, or None for anything malformed."""
    if len(datagram) > MAX_DATAGRAM:
        return None
    try:
        message = msgpack.unpackb(datagram, raw=False, strict_map_key=True)
    except Exception:  # garbage from the network is dropped, whatever the decoder says
        return None
    if not isinstance(message, dict) or message.get("t") != kind or message.get("v") != _VERSION:
        return None
    nonce, mac = message.get("nonce"), message.get("mac")
    if not isinstance(nonce, bytes) or len(nonce) != 32 or not isinstance(mac, bytes):
        return None
    return message


def check_probe(key: bytes, datagram: bytes) -> bytes | None:
    """The probe's nonce if it is a probe made with `key`, else None."""
    message = _decode(datagram, "cake-discover")
    if message is None or not hmac.compare_digest(
        message["mac"], _mac(key, "discover", message["nonce"])
    ):
        return None
    return message["nonce"]


def check_announcement(key: bytes, nonce: bytes, datagram: bytes) -> tuple[str, int] | None:
    """(name, port) if this answers our probe `nonce` and was made with `key`, else None."""
    message = _decode(datagram, "cake-here")
    if message is None or message["nonce"] != nonce:
        return None
    name, port = message.get("name"), message.get("port")
    if not isinstance(name, str) or not 1 <= len(name) <= 200:
        return None
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        return None
    expected = _mac(key, "announce", nonce, name.encode(), str(port).encode())
    if not hmac.compare_digest(message["mac"], expected):
        return None
    return name, port


class _Responder(asyncio.DatagramProtocol):
    def __init__(self, key: bytes, name: str, port: int) -> None:
        self.key, self.name, self.port = key, name, port
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        nonce = check_probe(self.key, data)
        if nonce is None or self.transport is None:
            return  # not for us (or not from our cluster): stay silent
        self.transport.sendto(announcement(self.key, nonce, self.name, self.port), addr)


def _udp_socket(port: int, broadcast: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # Several workers on one machine share the discovery port; each gets every broadcast.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if broadcast:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.bind(("0.0.0.0", port))
    sock.setblocking(False)
    return sock


async def respond(key: bytes, name: str, tcp_port: int, udp_port: int) -> asyncio.BaseTransport:
    """Answer authenticated probes on `udp_port` until the returned transport is closed."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Responder(key, name, tcp_port), sock=_udp_socket(udp_port, broadcast=False)
    )
    log.info("answering discovery probes on UDP port %d", udp_port)
    return transport


def broadcast_addresses() -> list[str]:
    """255.255.255.255 and every interface's own IPv4 broadcast address (Linux)."""
    found = ["255.255.255.255"]
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                request = struct.pack("256s", name.encode()[:15])
                answer = fcntl.ioctl(sock.fileno(), _SIOCGIFBRDADDR, request)
                address = socket.inet_ntoa(answer[20:24])
                if address not in ("0.0.0.0", *found):
                    found.append(address)
    return found


class _Collector(asyncio.DatagramProtocol):
    def __init__(self, key: bytes, nonce: bytes) -> None:
        self.key, self.nonce = key, nonce
        self.found: dict[tuple[str, int], Found] = {}
        self.changed = asyncio.Event()

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        answer = check_announcement(self.key, self.nonce, data)
        if answer is None:
            log.debug("ignored a discovery answer from %s (not from our cluster)", addr[0])
            return
        name, port = answer
        if (addr[0], port) not in self.found:
            self.found[(addr[0], port)] = Found(name, addr[0], port)
            log.info("discovered worker %s at %s:%d", name, addr[0], port)
            self.changed.set()


async def discover(
    key: bytes,
    timeout: float,
    min_workers: int | None = None,
    port: int = DEFAULT_DISCOVERY_PORT,
    targets: list[str] | None = None,
) -> list[Found]:
    """Probe every `PROBE_INTERVAL_S` until `min_workers` answered or `timeout` passed."""
    nonce = os.urandom(32)
    loop = asyncio.get_running_loop()
    transport, collector = await loop.create_datagram_endpoint(
        lambda: _Collector(key, nonce), sock=_udp_socket(0, broadcast=True)
    )
    targets = targets or broadcast_addresses()
    deadline = time.monotonic() + timeout
    try:
        while True:
            for target in targets:
                with contextlib.suppress(OSError):  # e.g. no route for 255.255.255.255
                    transport.sendto(probe(key, nonce), (target, port))
            if min_workers is not None and len(collector.found) >= min_workers:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            collector.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(collector.changed.wait(), min(PROBE_INTERVAL_S, left))
    finally:
        transport.close()
    return sorted(collector.found.values(), key=lambda f: (f.host, f.port))
