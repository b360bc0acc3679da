"""The thin asyncio layer around `protocol`: one framed, typed message stream per TCP connection.

Shared by both ends. TCP_NODELAY on every socket (a decode step is one small frame each way;
Nagle's algorithm would hold it back), `OSError` translated into `LinkError`, and the connection
closed on any failure mid-frame, since the framing is unknown after that. TCP keepalive on every
socket, and a frame limit the owner tightens or widens as the peer proves who it is.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl as ssl_module
import sys

from cake.wire.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    FrameDecoder,
    Message,
    ProtocolError,
    frame_buffers,
    parse_message,
)

READ_CHUNK = 1 << 20
# Once a frame has started, the rest of it must arrive within this many seconds: a peer that
# trickles bytes (or stalls mid-frame) cannot hold a connection and its buffer forever.
FRAME_TIMEOUT_S = 60.0


class LinkError(ConnectionError):
    """The connection failed or closed; the message says which peer and why."""


async def _read_within(reader: asyncio.StreamReader, timeout: float | None) -> bytes:
    """reader.read under a timeout, without wait_for's extra task per call where possible."""
    if timeout is None:
        return await reader.read(READ_CHUNK)
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(timeout):
            return await reader.read(READ_CHUNK)
    return await asyncio.wait_for(reader.read(READ_CHUNK), timeout)  # pragma: no cover


# TCP keepalive: the kernel probes a connection idle this long, then every interval, and drops
# it after that many missed probes (~60 s in all). The master's heartbeat notices a frozen worker
# sooner; keepalive is what lets a worker notice a master whose host vanished.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 30, 10, 3


def _keepalive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),  # Linux; macOS calls it TCP_KEEPALIVE
        ("TCP_KEEPALIVE", KEEPALIVE_IDLE_S),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
    ):
        if hasattr(socket, option):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class TLSFailure(LinkError):
    """The TLS handshake failed: an untrusted certificate, or TLS on one side only."""


class Link:
    """A framed message stream over one connection."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_tensor_elements: int | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.decoder = FrameDecoder(max_frame_bytes)
        self.max_tensor_elements = max_tensor_elements
        self.inbox: collections.deque[dict] = collections.deque()  # decoded, not yet received
        self.max_frame_bytes = max_frame_bytes
        self._send_lock = asyncio.Lock()  # one frame at a time from concurrent tasks
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # A peer that reset the connection as it was accepted leaves a closed descriptor:
            # setsockopt then fails (EBADF). The first read or write reports the loss as a
            # LinkError, which reconnecting handles; raised here, the OSError escaped it.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                _keepalive(sock)

    def set_frame_limit(self, max_frame_bytes: int) -> None:
        """Change the largest frame accepted (and sent) from the next frame on: small before
        the peer is authenticated, the session's real maximum after."""
        self.max_frame_bytes = max_frame_bytes
        self.decoder.max_frame_bytes = max_frame_bytes

    async def send(self, message: Message) -> None:
        # One buffer for a small frame; the prefix and the packed body of a large one, written
        # as they are (the transport sends them now or keeps them until it can: never mutated).
        buffers = frame_buffers(message.to_wire(), max_frame_bytes=self.max_frame_bytes)
        try:
            async with self._send_lock:
                for buffer in buffers:
                    self.writer.write(buffer)
                await self.writer.drain()
        except (OSError, RuntimeError) as exc:  # RuntimeError: writing to a closed transport
            self.close()
            raise LinkError(f"{self.peer}: send failed ({exc})") from exc

    async def recv_raw(self, timeout: float | None = None) -> dict:
        """The next wire dict (not yet checked as a message). ProtocolError on bad bytes.

        `timeout` bounds the wait for a new frame (None: wait forever); a started frame must
        complete within FRAME_TIMEOUT_S. Either raises TimeoutError.
        """
        while not self.inbox:
            wait = timeout
            if self.decoder.pending_bytes:
                wait = FRAME_TIMEOUT_S if timeout is None else min(timeout, FRAME_TIMEOUT_S)
            try:
                chunk = await _read_within(self.reader, wait)
            except TimeoutError:
                raise
            except (OSError, asyncio.IncompleteReadError) as exc:
                self.close()
                raise LinkError(f"{self.peer}: connection lost ({exc})") from exc
            if not chunk:
                self.close()
                cut = " in the middle of a frame" if self.decoder.pending_bytes else ""
                raise LinkError(f"{self.peer}: connection closed{cut}")
            self.inbox.extend(self.decoder.feed(chunk))
        return self.inbox.popleft()

    async def recv(self, timeout: float | None = None) -> Message:
        return parse_message(
            await self.recv_raw(timeout), max_tensor_elements=self.max_tensor_elements
        )

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()

    def abort(self) -> None:
        """Close now, dropping unsent bytes: a close would wait for a stalled peer to read them."""
        self.writer.transport.abort()

    async def wait_closed(self) -> None:
        self.close()
        with contextlib.suppress(OSError, ssl_module.SSLError):
            await self.writer.wait_closed()


async def open_link(
    host: str,
    port: int,
    peer: str,
    timeout: float,
    ssl: ssl_module.SSLContext | None = None,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> Link:
    """Connect under a timeout; LinkError that names the peer and address on failure."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl, limit=READ_CHUNK), timeout
        )
    except TimeoutError:
        raise LinkError(f"{peer}: no answer within {timeout:g}s") from None
    except ssl_module.SSLError as exc:
        raise TLSFailure(
            f"{peer}: TLS handshake failed ({exc.reason or exc}); --tls-ca must trust the "
            "worker's certificate, which must name the host the topology uses"
        ) from exc
    except OSError as exc:
        raise LinkError(f"{peer}: cannot connect ({exc.strerror or exc})") from exc
    return Link(reader, writer, peer, max_frame_bytes=max_frame_bytes)


__all__ = ["Link", "LinkError", "ProtocolError", "TLSFailure", "open_link"]
