"""One master's connection to a worker: admission, handshake, frame limits, requests, errors.

What a peer can make the worker hold, and what an error closes:

* **Before the handshake** (the cluster key proved, when one is set, and hello said) a peer is a
  stranger: its frames may be at most HANDSHAKE_MAX_FRAME_BYTES, the whole handshake must finish
  within HANDSHAKE_TIMEOUT_S, and at most MAX_UNAUTHENTICATED such connections exist at once
  (more are refused at once). A stranger can make the worker buffer a few KB, no more.
* **After it**, the frame limit is the session's real maximum: a full context of hidden states
  in f32 (protocol.session_frame_limit), not a fixed 512 MiB.
* **A request's error** (context full, unknown session, bad block, out of memory, any failure
  in its compute) is answered with an error carrying that request's id; the connection, which
  every other session of that master shares, stays open. Only a peer that breaks the protocol
  itself (a malformed frame or message) loses the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Protocol

from cake.errors import CakeError, Code
from cake.wire.handshake import answer_hello, greet_master
from cake.wire.protocol import (
    HANDSHAKE_MAX_FRAME_BYTES,
    CloseSession,
    ErrorMessage,
    ForkSession,
    Forward,
    ForwardBatch,
    Hello,
    Message,
    Ping,
    Pong,
    ProtocolError,
    Welcome,
)
from cake.wire.transport import Link, LinkError

log = logging.getLogger("cake.worker")

HANDSHAKE_TIMEOUT_S = 10.0
MAX_UNAUTHENTICATED = 16  # connections still in their handshake, at once


class Requests(Protocol):
    async def accept(
        self, conn: int, link: Link, request: Forward | ForwardBatch, tasks: set[asyncio.Task]
    ) -> None:
        """Check a forward now, in wire order; compute and answer it as a task in `tasks`."""
        ...


class ConnectionHost(Protocol):
    """What a connection needs of the worker it reaches (cake/worker.py)."""

    name: str
    cluster_key: bytes | None
    idle_timeout: float
    links: set[Link]  # every open connection, to close them all on shutdown
    unauthenticated: int  # connections still in their handshake
    connection_ids: Iterator[int]
    requests: Requests

    @property
    def session_frame_bytes(self) -> int:
        """A session's largest frame: a full context of hidden states (after the handshake)."""
        ...

    @property
    def max_tensor_elements(self) -> int:
        """A tensor larger than a full context of hidden states is never legitimate."""
        ...

    def welcome(self) -> Welcome: ...

    def close_session(self, conn: int, session_id: str, keep: bool = False) -> None: ...

    def fork_session(self, conn: int, request: ForkSession) -> Message:
        """Answer a ForkSession: SessionForked, or an error for that request alone."""
        ...

    def drop_connection(self, conn: int) -> None:
        """The connection ended: its sessions' caches go with it."""
        ...


async def serve_connection(
    worker: ConnectionHost,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    accepted: tuple[Link, Hello] | None = None,
) -> None:
    """Serve one master's connection. `accepted`: a link whose peer already proved the cluster
    key to an empty worker (cake/cluster/empty_worker.py), and the hello it sent; only the hello is
    left to answer."""
    conn = next(worker.connection_ids)
    address = writer.get_extra_info("peername")
    peer = f"{address[0]}:{address[1]}" if address else "peer"
    max_elements = worker.max_tensor_elements
    if accepted is not None:
        link = accepted[0]
        link.max_tensor_elements = max_elements
    else:
        link = Link(
            reader,
            writer,
            peer,
            max_frame_bytes=HANDSHAKE_MAX_FRAME_BYTES,
            max_tensor_elements=max_elements,
        )
    worker.links.add(link)
    tasks: set[asyncio.Task] = set()
    try:
        if accepted is not None:
            hello = await answer_hello(link, accepted[1], worker.welcome())
            link.set_frame_limit(worker.session_frame_bytes)
            log.info("master %r connected from %s (assigned by it)", hello.master, peer)
            await _serve_requests(worker, conn, link, tasks)
            return
        if worker.unauthenticated >= MAX_UNAUTHENTICATED:
            log.warning(
                "connection from %s refused: %d handshakes under way", peer, MAX_UNAUTHENTICATED
            )
            await try_send(
                link,
                ErrorMessage(
                    message=f"worker {worker.name} has {MAX_UNAUTHENTICATED} connections in "
                    "their handshake already; try again shortly",
                    code=Code.HANDSHAKE_BUSY.value,
                ),
            )
            return
        log.info("connection %d from %s", conn, peer)
        worker.unauthenticated += 1
        try:
            hello = await asyncio.wait_for(
                greet_master(link, worker.welcome(), worker.cluster_key, HANDSHAKE_TIMEOUT_S),
                HANDSHAKE_TIMEOUT_S,
            )
        finally:
            worker.unauthenticated -= 1
        link.set_frame_limit(worker.session_frame_bytes)
        log.info("master %r connected from %s", hello.master, peer)
        await _serve_requests(worker, conn, link, tasks)
    except CakeError as exc:  # a refusal in the handshake, or a ProtocolError at any time
        log.warning("connection %d from %s: %s (%s); closing it", conn, peer, exc, exc.code.value)
        await try_send(link, ErrorMessage(message=str(exc), code=exc.code.value))
    except MemoryError:  # buffering a frame: its framing is lost with it, so the link goes
        log.error("connection %d from %s: out of memory reading a frame; closing it", conn, peer)
        await try_send(
            link,
            ErrorMessage(
                message=f"worker {worker.name} ran out of memory receiving a frame of up to "
                f"{link.max_frame_bytes} bytes; free memory there or lower --max-seq-len",
                code=Code.OUT_OF_MEMORY.value,
            ),
        )
    except (TimeoutError, asyncio.TimeoutError):
        log.info("connection %d from %s: silent too long, closing it", conn, peer)
    except LinkError as exc:
        log.info("connection %d: %s", conn, exc)
    finally:
        for task in tasks:
            task.cancel()
        worker.drop_connection(conn)
        worker.links.discard(link)
        await link.wait_closed()


async def _serve_requests(
    host: ConnectionHost, conn: int, link: Link, tasks: set[asyncio.Task]
) -> None:
    while True:
        message = await link.recv(timeout=host.idle_timeout)
        if isinstance(message, Forward | ForwardBatch):
            await host.requests.accept(conn, link, message, tasks)
        elif isinstance(message, CloseSession):
            host.close_session(conn, message.session, message.keep)
        elif isinstance(message, ForkSession):  # in wire order: before the session's forwards
            await link.send(host.fork_session(conn, message))
        elif isinstance(message, Ping):
            await link.send(Pong(id=message.id))
        else:
            raise ProtocolError(f"a master does not send {type(message).__name__!r}")


async def try_send(link: Link, message: ErrorMessage) -> None:
    with contextlib.suppress(LinkError):
        await link.send(message)
