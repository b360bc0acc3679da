"""One authenticated connection from the master to a worker, and everything that dies with it.

A channel owns its requests in flight (id -> future), the reader task that hands each reply to
its request, and the heartbeat task that drives a `LinkClock` (see cake/wire/liveness.py): pings
on a quiet link, a deadline per request. When the link fails, is found stalled, or is closed,
every request still waiting on *this* channel fails with WorkerLost; a newer channel to the
same worker has its own map and is never touched by an old reader.

Requests carry ids, so several sessions can have forwards in flight on one channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable

from cake.errors import WorkerLost
from cake.wire.liveness import LinkClock, LivenessSettings, Lost, SendPing
from cake.wire.protocol import (
    BatchResult,
    ErrorMessage,
    Message,
    Ping,
    Pong,
    ProtocolError,
    Result,
    SessionForked,
)
from cake.wire.transport import Link, LinkError

log = logging.getLogger(__name__)

# what answers a request (by its id)
REPLIES = (Result, BatchResult, SessionForked, ErrorMessage)


class Channel:
    def __init__(
        self,
        link: Link,
        label: str,
        settings: LivenessSettings,
        on_lost: Callable[[Channel], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.link = link
        self.label = label
        self.now = clock
        self.clock = LinkClock(settings, now=clock())
        self.closed_reason: str | None = None  # set once, when the channel dies
        self._on_lost = on_lost
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()  # a new deadline may come before the heartbeat's next tick
        self._sleeping_until = 0.0  # when the heartbeat task wakes next
        self._reader = asyncio.create_task(self._read_loop())
        self._heartbeat = asyncio.create_task(self._watch())

    @property
    def alive(self) -> bool:
        return self.closed_reason is None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def request(self, make: Callable[[int], Message], positions: int) -> Message:
        """Send `make(request_id)` and wait for its reply (a Result or an ErrorMessage).

        WorkerLost if the channel dies first (link failure, stall, deadline, close).
        """
        if self.closed_reason is not None:
            raise WorkerLost(f"{self.label}: {self.closed_reason}")
        request_id = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        deadline = self.clock.request_sent(request_id, positions, self.now())
        if deadline is not None and deadline < self._sleeping_until:
            self._wake.set()  # rare: deadlines are usually far beyond the next heartbeat
        try:
            try:
                await self.link.send(make(request_id))
            except LinkError as exc:
                self.fail(str(exc))
            return await future
        finally:
            if self._pending.pop(request_id, None) is not None:  # cancelled or failed to send
                self.clock.request_dropped(request_id)

    async def send(self, message: Message) -> None:
        """A message with no reply (close_session); LinkError if the link is gone."""
        if self.closed_reason is not None:
            raise LinkError(f"{self.label}: {self.closed_reason}")
        await self.link.send(message)

    def fail(self, reason: str) -> None:
        """End this channel: close the link, fail what waits on it, tell the owner (once)."""
        if self.closed_reason is not None:
            return
        # A link error names the peer already ("worker w1 at host:port: connection lost").
        self.closed_reason = reason.removeprefix(f"{self.label}: ")
        self.link.abort()  # the peer may be frozen: do not wait for it to read anything
        error = WorkerLost(f"{self.label}: {self.closed_reason}")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        for task in (self._reader, self._heartbeat):
            if task is not asyncio.current_task():
                task.cancel()
        if self._on_lost is not None:
            self._on_lost(self)

    async def close(self) -> None:
        self.fail("connection closed")
        for task in (self._reader, self._heartbeat):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.link.wait_closed()

    async def _read_loop(self) -> None:
        try:
            while True:
                message = await self.link.recv()
                now = self.now()
                self.clock.heard(now)
                if isinstance(message, Pong):
                    continue
                request_id = getattr(message, "id", None)
                if isinstance(message, REPLIES) and request_id is not None:
                    self.clock.reply_received(request_id, now)
                    future = self._pending.pop(request_id, None)
                    if future is not None and not future.done():
                        future.set_result(message)
                elif isinstance(message, ErrorMessage):  # about the link itself: it closes
                    self.fail(message.message)
                    return
                else:
                    raise ProtocolError(f"unexpected {type(message).__name__} from a worker")
        except (LinkError, ProtocolError) as exc:
            self.fail(str(exc))

    async def _watch(self) -> None:
        """The heartbeat: sleep until the clock's next decision, then act on it."""
        while self.closed_reason is None:
            self._sleeping_until = self.clock.next_tick()
            delay = self._sleeping_until - self.now()
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):  # TimeoutError from 3.11
                    await asyncio.wait_for(self._wake.wait(), delay)
                continue
            actions = self.clock.tick(self.now())
            for action in actions:
                if isinstance(action, Lost):
                    log.warning("%s: %s; treating it as lost", self.label, action.reason)
                    self.fail(action.reason)
                    return
                if isinstance(action, SendPing):
                    try:
                        await self.link.send(Ping(id=action.id))
                    except LinkError as exc:
                        self.fail(str(exc))
                        return
            if not actions:  # the clock moved between next_tick and tick: look again soon
                await asyncio.sleep(0.01)
