"""The master's side of a worker: one connection per worker, shared by its stages and sessions.

Requests carry ids, so several sessions (the HTTP API's concurrent requests) can have forwards in
flight on one connection; a reader task hands each result to the request that awaits it.

A worker that dies or whose connection breaks loses every session's KV caches. The master then
reconnects with backoff for up to `retry_timeout` seconds and, per session, replays the hidden
states that stage has received so far (kept by `RemoteStage`), which rebuilds exactly the lost
caches without running the other stages again; then it carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
import time
from dataclasses import dataclass, field

import torch

from cake.auth import check_proof, new_nonce, proof
from cake.errors import WorkerError
from cake.protocol import (
    AuthChallenge,
    AuthProof,
    AuthResponse,
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
from cake.topology import Node, format_blocks
from cake.transport import Link, LinkError, TLSFailure, open_link

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_RETRY_TIMEOUT_S = 60.0
REPLAY_CHUNK = 512  # positions per replay request, to keep frames moderate


class WorkerLost(WorkerError):
    """The connection failed (worker down, network); retrying may help, unlike a refusal."""


class WorkerClient:
    def __init__(
        self,
        node: Node,
        fingerprint: str,
        master_name: str = "cake-master",
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT_S,
        cluster_key: bytes | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.node = node
        self.fingerprint = fingerprint
        self.master_name = master_name
        self.connect_timeout = connect_timeout
        self.retry_timeout = retry_timeout
        self.cluster_key = cluster_key
        self.tls = tls
        self.link: Link | None = None
        self.welcome: Welcome | None = None
        self.epoch = 0  # +1 per successful connection: sessions of older epochs are gone
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._ids = itertools.count(1)
        self._reader: asyncio.Task | None = None
        self._connecting = asyncio.Lock()

    @property
    def label(self) -> str:
        return f"worker {self.node.name} at {self.node.address}"

    async def connect(self) -> Welcome:
        """Open the connection, authenticate, check the worker serves what the topology says."""
        try:
            link = await open_link(
                self.node.host, self.node.port, self.label, self.connect_timeout, ssl=self.tls
            )
        except TLSFailure as exc:
            raise WorkerError(str(exc)) from None
        except LinkError as exc:
            raise WorkerLost(f"{exc}; is the worker running?") from None
        try:
            welcome = await self._handshake(link)
        except BaseException:
            await link.wait_closed()
            raise
        self.link, self.welcome = link, welcome
        self.epoch += 1
        self._reader = asyncio.create_task(self._read_loop(link))
        log.info(
            "connected to %s: blocks %s on %s (%s)",
            self.label,
            format_blocks(welcome.blocks),
            welcome.device,
            welcome.dtype,
        )
        return welcome

    async def _handshake(self, link: Link) -> Welcome:
        try:
            if self.cluster_key is not None:
                await self._authenticate(link, self.cluster_key)
            await link.send(Hello(fingerprint=self.fingerprint, master=self.master_name))
            reply = await link.recv(timeout=self.connect_timeout)
        except TimeoutError:
            raise WorkerLost(f"{self.label}: handshake timed out") from None
        except LinkError as exc:
            hint = "" if self.tls else " (if the worker uses TLS, pass --tls-ca)"
            raise WorkerLost(f"{self.label}: handshake failed: {exc}{hint}") from None
        except ProtocolError as exc:
            raise WorkerError(f"{self.label}: handshake failed: {exc}") from None
        if isinstance(reply, ErrorMessage):
            raise WorkerError(f"{self.label} refused the connection: {reply.message}")
        if not isinstance(reply, Welcome):
            raise WorkerError(f"{self.label}: expected 'welcome', got {type(reply).__name__}")
        if set(reply.blocks) != set(self.node.blocks):
            raise WorkerError(
                f"{self.label} serves blocks {list(reply.blocks)}, but the topology gives it "
                f"{list(self.node.blocks)}; restart the worker with the same topology file"
            )
        return reply

    async def _authenticate(self, link: Link, key: bytes) -> None:
        master_nonce = new_nonce()
        await link.send(AuthChallenge(nonce=master_nonce))
        reply = await link.recv(timeout=self.connect_timeout)
        if isinstance(reply, ErrorMessage):
            raise WorkerError(f"{self.label} refused the connection: {reply.message}")
        if not isinstance(reply, AuthResponse):
            raise WorkerError(f"{self.label}: expected 'auth_response', got {reply}")
        if not check_proof(key, "worker", master_nonce, reply.nonce, reply.proof):
            raise WorkerError(
                f"{self.label}: cluster key mismatch (the worker does not know our key); "
                "use the same --cluster-key / CAKE_CLUSTER_KEY everywhere"
            )
        await link.send(AuthProof(proof=proof(key, "master", master_nonce, reply.nonce)))

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
            error = WorkerLost(f"{self.label}: connection closed")
        link.close()
        if self.link is link:
            self.link = None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(WorkerLost(str(error)))
        self._pending.clear()

    def gave_up(self, cause: Exception) -> WorkerError:
        return WorkerError(
            f"{self.label} did not come back within {self.retry_timeout:g}s "
            f"(--retry-timeout): {cause}"
        )

    async def ensure_connected(self, deadline: float) -> None:
        """Reconnect (with backoff, until `deadline`) if the connection is gone."""
        async with self._connecting:
            delay = 0.1
            while self.link is None:
                try:
                    await self.connect()
                except WorkerLost as exc:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise self.gave_up(exc) from None
                    log.warning("%s; retrying in %.1fs", exc, min(delay, left))
                    await asyncio.sleep(min(delay, left))
                    delay = min(delay * 2, 2.0)

    async def forward(
        self, session: str, start_pos: int, blocks: range, hidden: torch.Tensor
    ) -> Result:
        link = self.link
        if link is None:
            raise WorkerLost(f"{self.label}: not connected")
        request_id = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        request = Forward(
            id=request_id,
            session=session,
            start_pos=start_pos,
            blocks=tuple(blocks),
            hidden=hidden,
        )
        try:
            await link.send(request)
        except LinkError as exc:
            self._pending.pop(request_id, None)
            if self.link is link:
                self.link = None  # reconnect next time; the reader sees the close on its own
            raise WorkerLost(str(exc)) from None
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


@dataclass
class SessionInputs:
    """The hidden states a stage has received for one session, in position order."""

    epoch: int  # the connection epoch the worker's caches for this session belong to
    chunks: list[torch.Tensor] = field(default_factory=list)  # each (1, T_i, C), on the CPU
    length: int = 0

    def add(self, start_pos: int, hidden: torch.Tensor) -> None:
        self.truncate(start_pos)  # a forward at start_pos replaces everything from there on
        self.chunks.append(hidden.detach().to("cpu"))
        self.length += hidden.shape[1]

    def truncate(self, length: int) -> None:
        """Keep positions 0..length-1 (a rewind or a rollback), so a replay never rebuilds
        positions the master has dropped."""
        if length < self.length:
            kept = torch.cat(self.chunks, dim=1)[:, :length] if length else None
            self.chunks = [kept] if kept is not None else []
            self.length = length


class RemoteStage:
    """One maximal run of consecutive blocks served by one worker: one round trip per step."""

    def __init__(self, client: WorkerClient, blocks: range) -> None:
        self.client = client
        self.blocks = blocks
        whole = len(client.node.blocks) == len(blocks)
        self.label = (
            client.node.name if whole else f"{client.node.name}[{blocks.start}-{blocks.stop - 1}]"
        )
        self.inputs: dict[str, SessionInputs] = {}

    async def forward(
        self, session_id: str, hidden: torch.Tensor, start_pos: int, times: StageTimes
    ) -> torch.Tensor:
        client = self.client
        inputs = self.inputs.setdefault(session_id, SessionInputs(epoch=client.epoch))
        deadline: float | None = None
        while True:
            try:
                if client.link is None or inputs.epoch != client.epoch:
                    deadline = deadline or time.monotonic() + client.retry_timeout
                    await client.ensure_connected(deadline)
                    if inputs.epoch != client.epoch:
                        await self._replay(session_id, inputs, times)
                started = time.perf_counter()
                result = await client.forward(session_id, start_pos, self.blocks, hidden)
                break
            except WorkerLost as exc:
                if deadline is None:
                    log.warning("%s; reconnecting (up to %gs)", exc, client.retry_timeout)
                    deadline = time.monotonic() + client.retry_timeout
                elif time.monotonic() > deadline:
                    raise client.gave_up(exc) from None
        elapsed = time.perf_counter() - started
        compute = result.compute_us / 1e6
        times.round_trips += 1
        times.compute_s += compute
        times.wire_s += max(elapsed - compute, 0.0)
        inputs.add(start_pos, hidden)
        return result.hidden.to(device=hidden.device, dtype=hidden.dtype)

    async def _replay(self, session_id: str, inputs: SessionInputs, times: StageTimes) -> None:
        """Rebuild this session's caches on a reconnected worker from the inputs it had seen."""
        epoch = self.client.epoch
        if inputs.length:
            log.info(
                "%s: replaying %d positions of session %s (blocks %d-%d)",
                self.client.label,
                inputs.length,
                session_id[:8],
                self.blocks.start,
                self.blocks.stop - 1,
            )
            seen = torch.cat(inputs.chunks, dim=1)  # (1, length, C)
            inputs.chunks = [seen]
            for start in range(0, inputs.length, REPLAY_CHUNK):
                await self.client.forward(
                    session_id, start, self.blocks, seen[:, start : start + REPLAY_CHUNK]
                )
                times.round_trips += 1
        inputs.epoch = epoch

    async def rollback(self, session_id: str, length: int) -> None:
        # No message: the worker drops positions >= start_pos of every forward it runs (see
        # protocol.Forward), so the next forward, at `length`, rolls it back in the same trip.
        inputs = self.inputs.get(session_id)
        if inputs is not None:
            inputs.truncate(length)

    async def close_session(self, session_id: str) -> None:
        self.inputs.pop(session_id, None)
        await self.client.close_session(session_id)

    async def close(self) -> None:
        self.inputs.clear()
        await self.client.close()
