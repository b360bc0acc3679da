"""The master's side of a worker: one connection per worker, shared by its stages and sessions.

Requests carry ids, so several sessions (the HTTP API's concurrent requests) can have forwards in
flight on one connection; a reader task hands each result to the request that awaits it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time

import torch

from cake.errors import WorkerError
from cake.protocol import (
    CloseSession,
    ErrorMessage,
    Forward,
    Hello,
    Message,
    Pong,
    ProtocolError,
    Result,
    Welcome,
)
from cake.stages import StageTimes
from cake.topology import Node
from cake.transport import Link, LinkError, open_link

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT_S = 10.0


class WorkerClient:
    def __init__(
        self,
        node: Node,
        fingerprint: str,
        master_name: str = "cake-master",
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
    ) -> None:
        self.node = node
        self.fingerprint = fingerprint
        self.master_name = master_name
        self.connect_timeout = connect_timeout
        self.link: Link | None = None
        self.welcome: Welcome | None = None
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._ids = itertools.count(1)
        self._reader: asyncio.Task | None = None

    @property
    def label(self) -> str:
        return f"worker {self.node.name} at {self.node.address}"

    async def connect(self) -> Welcome:
        """Open the connection and check that the worker serves what the topology says."""
        try:
            link = await open_link(self.node.host, self.node.port, self.label, self.connect_timeout)
        except LinkError as exc:
            raise WorkerError(f"{exc}; is the worker running?") from None
        try:
            await link.send(Hello(fingerprint=self.fingerprint, master=self.master_name))
            reply = await link.recv(timeout=self.connect_timeout)
        except (LinkError, ProtocolError, TimeoutError) as exc:
            await link.wait_closed()
            raise WorkerError(f"{self.label}: handshake failed ({exc or 'timed out'})") from None
        if isinstance(reply, ErrorMessage):
            await link.wait_closed()
            raise WorkerError(f"{self.label} refused the connection: {reply.message}")
        if not isinstance(reply, Welcome):
            await link.wait_closed()
            raise WorkerError(f"{self.label}: expected 'welcome', got {type(reply).__name__}")
        if set(reply.blocks) != set(self.node.blocks):
            await link.wait_closed()
            raise WorkerError(
                f"{self.label} serves blocks {list(reply.blocks)}, but the topology gives it "
                f"{list(self.node.blocks)}; restart the worker with the same topology file"
            )
        self.link, self.welcome = link, reply
        self._reader = asyncio.create_task(self._read_loop(link))
        log.info(
            "connected to %s: blocks %s on %s (%s)",
            self.label,
            _span(reply.blocks),
            reply.device,
            reply.dtype,
        )
        return reply

    async def _read_loop(self, link: Link) -> None:
        error: Exception
        try:
            while True:
                message = await link.recv()
                request_id = getattr(message, "id", None)
                if isinstance(message, Result | Pong | ErrorMessage) and request_id is not None:
                    future = self._pending.pop(request_id, None)
                    if future is not None and not future.done():
                        future.set_result(message)
                elif isinstance(message, ErrorMessage):
                    raise WorkerError(f"{self.label}: {message.message}")
                else:
                    raise ProtocolError(f"unexpected {type(message).__name__} from a worker")
        except (LinkError, ProtocolError, WorkerError) as exc:
            error = exc
        except asyncio.CancelledError:
            error = WorkerError(f"{self.label}: connection closed")
        link.close()
        if self.link is link:
            self.link = None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(WorkerError(f"{self.label}: {error}"))
        self._pending.clear()

    async def forward(
        self, session: str, start_pos: int, blocks: range, hidden: torch.Tensor
    ) -> Result:
        if self.link is None:
            raise WorkerError(f"{self.label}: not connected")
        request_id = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self.link.send(
                Forward(
                    id=request_id,
                    session=session,
                    start_pos=start_pos,
                    blocks=tuple(blocks),
                    hidden=hidden,
                )
            )
        except LinkError as exc:
            self._pending.pop(request_id, None)
            raise WorkerError(str(exc)) from None
        reply = await future
        if isinstance(reply, ErrorMessage):
            raise WorkerError(f"{self.label} failed a request: {reply.message}")
        assert isinstance(reply, Result)
        return reply

    async def close_session(self, session: str) -> None:
        if self.link is not None:
            with contextlib.suppress(LinkError):
                await self.link.send(CloseSession(session=session))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self.link is not None:
            await self.link.wait_closed()
            self.link = None


class RemoteStage:
    """One maximal run of consecutive blocks served by one worker: one round trip per step."""

    def __init__(self, client: WorkerClient, blocks: range) -> None:
        self.client = client
        self.blocks = blocks
        self.label = (
            client.node.name
            if len(client.node.blocks) == len(blocks)
            else (f"{client.node.name}[{blocks.start}-{blocks.stop - 1}]")
        )

    async def forward(
        self, session_id: str, hidden: torch.Tensor, start_pos: int, times: StageTimes
    ) -> torch.Tensor:
        started = time.perf_counter()
        result = await self.client.forward(session_id, start_pos, self.blocks, hidden)
        elapsed = time.perf_counter() - started
        compute = result.compute_us / 1e6
        times.round_trips += 1
        times.compute_s += compute
        times.wire_s += max(elapsed - compute, 0.0)
        return result.hidden.to(device=hidden.device, dtype=hidden.dtype)

    async def close_session(self, session_id: str) -> None:
        await self.client.close_session(session_id)

    async def close(self) -> None:
        await self.client.close()


def _span(blocks: tuple[int, ...]) -> str:
    return f"{min(blocks)}-{max(blocks)}" if blocks else "none"
