"""A worker's door while it loads its blocks: it listens from the start and tells a master how
far it is, so the master's wait is visible and a restarted worker is found at once.

The worker binds its socket before it loads anything. While the main thread loads (the thread
that will compute, see cake/engine/worker_requests.py on OpenMP teams), this listener serves a
duplicate of the socket on an event loop of its own thread: a master that connects gets the key
check and the hello check of the real handshake, then a `loading` refusal whose message says
how far the load is ("loading blocks 0-14: 6 of 15 done"); the master waits and asks again while
that figure moves (cake/wire/worker_link.py). The refused connection stays open until the
blocks are loaded (or the master closes it to ask again, or HANDSHAKE_TIMEOUT_S passes): its
close is the master's signal that the worker serves now, so a restarted worker is used the
moment it can be, not a polling interval later. Once the blocks are loaded the listener closes
those connections and stops, and the worker serves the original socket: a connection waiting in
the backlog meanwhile is simply accepted by the worker.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from collections.abc import Callable

from cake.errors import CakeError, Code
from cake.wire.handshake import refuse_while_loading
from cake.wire.protocol import HANDSHAKE_MAX_FRAME_BYTES, ErrorMessage
from cake.wire.transport import Link, LinkError
from cake.wire.worker_connection import HANDSHAKE_TIMEOUT_S, MAX_UNAUTHENTICATED, try_send

log = logging.getLogger("cake.worker")


class LoadingListener:
    """Answers masters with the load's progress until `stop()`; see the module docstring."""

    def __init__(
        self,
        sock: socket.socket,
        name: str,
        fingerprint: str,
        status: Callable[[], str],
        cluster_key: bytes | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.name = name
        self.fingerprint = fingerprint
        self.status = status  # what the refusal says: how far the load is, now
        self.cluster_key = cluster_key
        self.tls = tls
        self.answered = 0  # masters told to come back (for the log and the tests)
        self._sock = sock.dup()
        self._waiting = 0
        self._open: dict[Link, asyncio.Task] = {}  # connections in its hands, and their tasks
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cake-loading", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)

    def stop(self) -> None:
        """Stop answering and close the connections in its hands (a master waiting on one
        connects again now); the original socket stays open."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            server = await asyncio.start_server(self._answer, sock=self._sock, ssl=self.tls)
        finally:
            self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()
            for link in self._open:
                link.close()
            if self._open:  # let them end, rather than be cancelled with the loop
                await asyncio.wait(self._open.values(), timeout=HANDSHAKE_TIMEOUT_S)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address = writer.get_extra_info("peername")
        peer = f"{address[0]}:{address[1]}" if address else "peer"
        link = Link(reader, writer, peer, max_frame_bytes=HANDSHAKE_MAX_FRAME_BYTES)
        if self._waiting >= MAX_UNAUTHENTICATED:
            busy = f"worker {self.name} is loading its blocks; try again shortly"
            await try_send(link, ErrorMessage(message=busy, code=Code.HANDSHAKE_BUSY.value))
            await link.wait_closed()
            return
        self._waiting += 1
        task = asyncio.current_task()
        assert task is not None
        self._open[link] = task
        try:
            await asyncio.wait_for(
                refuse_while_loading(
                    link,
                    self.name,
                    self.fingerprint,
                    self.cluster_key,
                    HANDSHAKE_TIMEOUT_S,
                    self.status(),
                ),
                HANDSHAKE_TIMEOUT_S,
            )
            self.answered += 1
            # Held until the blocks are loaded (then `stop` closes it), the master closes it
            # (to ask again how far the load is), or the timeout; the master sends nothing.
            await link.recv(timeout=HANDSHAKE_TIMEOUT_S)
        except CakeError as exc:  # the key or the hello is wrong: say so now, not after loading
            log.warning("connection from %s while loading: %s; closing it", peer, exc)
            await try_send(link, ErrorMessage(message=str(exc), code=exc.code.value))
        except (TimeoutError, asyncio.TimeoutError, LinkError):
            pass
        finally:
            self._waiting -= 1
            del self._open[link]
            await link.wait_closed()


class LoadProgress:
    """How far a worker's load is, as the `loading` refusal says it; `advance` is called from
    the loading thread after each block."""

    def __init__(self, what: str, total: int) -> None:
        self.what = what  # "blocks 0-14"
        self.total = total
        self.done = 0

    def advance(self) -> None:
        self.done += 1

    def __str__(self) -> str:
        return f"loading {self.what}: {self.done} of {self.total} done"
