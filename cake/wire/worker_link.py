"""The master's client of one worker: connection, authentication, requests, reconnection.

A `WorkerClient` opens a connection (TCP, optionally TLS), proves the cluster key and says
hello (cake/wire/handshake.py), then carries every session's requests on one `Channel`
(cake/wire/channel.py: requests in flight, heartbeat, deadlines). When that channel dies the
worker is lost until `ensure_connected` brings a new one up (with backoff, cake/wire/retry.py);
`phase` (cake/wire/liveness.py) says which sessions must replay their inputs on it, and
`is_up` is the one answer to "is this worker's link up?" for everyone outside the wire.

Waiting for a worker that is starting (a first start, or a restart after a crash) ends as soon
as it serves: while its port refuses connections the master asks again every RESTART_POLL_S
(a refusal costs nothing, and the moment the new process listens cannot be known); once it
listens and says it is loading its blocks, it holds that connection until they are loaded and
then closes it (cake/wire/loading.py), so the master, waiting on it, asks again at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from cake.errors import (
    CakeError,
    WorkerError,
    WorkerGone,
    WorkerLoading,
    WorkerLost,
    WorkerRefused,
    WorkerUnreachable,
)
from cake.topology import Node, format_blocks
from cake.wire.channel import Channel
from cake.wire.handshake import greet_worker
from cake.wire.liveness import LinkPhase, LivenessSettings
from cake.wire.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    HANDSHAKE_MAX_FRAME_BYTES,
    BatchResult,
    CloseSession,
    ErrorMessage,
    ForkSession,
    Forward,
    ForwardBatch,
    Message,
    Result,
    SessionForked,
    Welcome,
)
from cake.wire.retry import retry
from cake.wire.transport import Link, LinkError, TLSFailure, open_link

log = logging.getLogger(__name__)

R = TypeVar("R")


DEFAULT_CONNECT_TIMEOUT_S = 10.0


DEFAULT_RETRY_TIMEOUT_S = 60.0
# Reconnection backoff: the first pause (also the shortest connect timeout), and the longest.
RECONNECT_FIRST_DELAY_S, RECONNECT_MAX_DELAY_S = 0.1, 2.0
RESTART_POLL_S = 0.05  # how often a master asks again an address that refuses connections
# The longest a master waits on a loading worker's held connection before asking again (to
# hear how far the load is); the worker closes it sooner, when its blocks are loaded.
LOADING_POLL_S = 0.5


def pause_before_next_attempt(failure: Exception, backoff: float) -> float:
    """How long to wait after `failure` before connecting again: an address that refuses is
    asked again at the short fixed RESTART_POLL_S; a worker that said it is loading at once
    (`connect` waited on the connection it held until its load ended, or LOADING_POLL_S);
    anything else after `backoff`."""
    if isinstance(failure, WorkerRefused):
        return RESTART_POLL_S
    if isinstance(failure, WorkerLoading):
        return 0.0
    return backoff


async def wait_for_load(link: Link, limit: float) -> None:
    """A worker that refused us as loading closes the connection once its blocks are loaded:
    wait for that, at most `limit` seconds, then close our end."""
    started = time.monotonic()
    with contextlib.suppress(TimeoutError, LinkError, CakeError):
        await link.recv(timeout=limit)  # the worker sends nothing more: this ends at its close
    await link.wait_closed()
    # A peer that closes at once is not asked again in a tight loop.
    await asyncio.sleep(max(0.0, min(RESTART_POLL_S, limit) - (time.monotonic() - started)))


class WorkerClient:
    """One worker, seen from the master: (re)connects, and knows whether it is up and which
    sessions must replay (its phase)."""

    def __init__(
        self,
        node: Node,
        fingerprint: str,
        master_name: str = "cake-master",
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT_S,
        cluster_key: bytes | None = None,
        tls: ssl.SSLContext | None = None,
        liveness: LivenessSettings | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self.node = node
        self.fingerprint = fingerprint
        self.master_name = master_name
        self.connect_timeout = connect_timeout
        self.retry_timeout = retry_timeout
        self.cluster_key = cluster_key
        self.tls = tls
        self.liveness = liveness or LivenessSettings()
        self.max_frame_bytes = max_frame_bytes  # after the handshake: the session's largest
        self.channel: Channel | None = None
        self.welcome: Welcome | None = None
        self.phase = LinkPhase()
        self._connecting = asyncio.Lock()
        self.closed = False  # by close(): never connects again

    @property
    def label(self) -> str:
        return f"worker {self.node.name} at {self.node.address}"

    @property
    def is_up(self) -> bool:
        """Whether the worker's link is up: connected, and the connection neither failed nor
        closed (as far as its channel knows: a dead peer is noticed by the channel's reader,
        heartbeat or a request's deadline). While it is not, requests raise WorkerLost and
        `ensure_connected` reconnects."""
        return self._live_channel() is not None

    def _live_channel(self) -> Channel | None:
        channel = self.channel
        return channel if channel is not None and channel.alive else None

    @property
    def epoch(self) -> int:
        return self.phase.epoch

    async def connect_when_ready(self) -> Welcome:
        """The first connection: a worker not listening yet is tried again until
        --connect-timeout; one that answers that it is still loading its blocks is waited for
        as long as its progress moves (each step logged), and given up on only after
        --connect-timeout without any."""
        started = moving_since = time.monotonic()
        status = ""
        while True:
            try:
                return await self.connect()
            except WorkerLoading as loading:
                now = time.monotonic()
                if str(loading) != status:
                    status, moving_since = str(loading), now
                    log.info("%s; waiting for it", status)
                elif now - moving_since > self.connect_timeout:
                    raise WorkerError(
                        f"{status}, with no progress for {self.connect_timeout:g}s "
                        "(--connect-timeout): is it out of memory or stuck reading its files?"
                    ) from None
                pause = pause_before_next_attempt(loading, LOADING_POLL_S)
            except WorkerUnreachable as unreachable:  # not listening yet (or down): starting?
                if time.monotonic() - started > self.connect_timeout:
                    raise
                pause = pause_before_next_attempt(unreachable, LOADING_POLL_S)
            await asyncio.sleep(pause)

    async def connect(self, timeout: float | None = None) -> Welcome:
        """Open a connection, authenticate, check the worker serves what the topology says."""
        if self.closed:
            raise WorkerLost(f"{self.label}: closed")
        timeout = self.connect_timeout if timeout is None else min(timeout, self.connect_timeout)
        try:
            link = await open_link(
                self.node.host,
                self.node.port,
                self.label,
                timeout,
                ssl=self.tls,
                max_frame_bytes=HANDSHAKE_MAX_FRAME_BYTES,  # a stranger until it proves the key
            )
        except TLSFailure as exc:
            raise WorkerError(str(exc)) from None
        except LinkError as exc:
            refused = isinstance(exc.__cause__, ConnectionRefusedError)
            unreachable = WorkerRefused if refused else WorkerUnreachable
            raise unreachable(f"{exc}; is the worker running?") from None
        try:
            welcome = await greet_worker(
                link,
                self.node,
                self.label,
                self.fingerprint,
                self.master_name,
                self.cluster_key,
                timeout,
                hint="" if self.tls else " (if the worker uses TLS, pass --tls-ca)",
            )
        except WorkerLoading:
            await wait_for_load(link, min(timeout, LOADING_POLL_S))
            raise
        except BaseException:
            await link.wait_closed()
            raise
        if self.closed:  # closed while we were connecting
            await link.wait_closed()
            raise WorkerLost(f"{self.label}: closed")
        link.set_frame_limit(self.max_frame_bytes)
        self.channel = Channel(link, self.label, self.liveness, on_lost=self._channel_lost)
        self.welcome = welcome
        self.phase.connected()
        log.info(
            "connected to %s: blocks %s on %s (%s)%s",
            self.label,
            format_blocks(welcome.blocks),
            welcome.device,
            welcome.dtype,
            f", kernels {welcome.kernels}" if welcome.kernels else "",
        )
        return welcome

    def _channel_lost(self, channel: Channel) -> None:
        if channel is self.channel:
            self.channel = None
            self.phase.lost(channel.clock.last_heard, channel.closed_reason or "lost")

    def retry_deadline(self, needed_since: float) -> float:
        """Give up at --retry-timeout after the worker was last heard (or after we first
        needed it, if it was lost before that)."""
        lost_since = self.phase.lost_since
        since = needed_since if lost_since is None else max(lost_since, needed_since)
        return since + self.retry_timeout

    def gave_up(self, cause: Exception) -> WorkerGone:
        return WorkerGone(
            f"{self.label} did not come back within {self.retry_timeout:g}s "
            f"(--retry-timeout): {cause}"
        )

    async def ensure_connected(self, deadline: float) -> None:
        """Reconnect (until `deadline`) if the connection is gone: a restarting worker is
        asked again every RESTART_POLL_S while its port refuses and at once when it has loaded
        its blocks (see the module docstring), after any other failure with backoff. One
        attempt even when the deadline has passed; WorkerGone when it did not come back by
        then."""
        said = ""

        def on_retry(lost: Exception, pause: float) -> None:
            nonlocal said
            if isinstance(lost, WorkerLoading | WorkerRefused):
                if str(lost) != said:  # once per step of its progress; a refusal once
                    said = str(lost)
                    loading = isinstance(lost, WorkerLoading)
                    pace = f"retrying every {RESTART_POLL_S:g}s"
                    log.warning("%s; %s", lost, "waiting for it" if loading else pace)
            else:
                log.warning("%s; retrying in %.1fs", lost, pause)

        async with self._connecting:
            if self.is_up:  # another task reconnected while this one waited
                return
            await retry(
                lambda left: self.connect(timeout=max(left, RECONNECT_FIRST_DELAY_S)),
                retry_on=WorkerLost,
                retry_if=lambda lost: not self.closed,  # close() ends the wait at once
                deadline=deadline,
                first_delay=RECONNECT_FIRST_DELAY_S,
                max_delay=RECONNECT_MAX_DELAY_S,
                on_retry=on_retry,
                pause_for=pause_before_next_attempt,
                give_up=self.gave_up,
            )

    async def forward(
        self, session: str, start_pos: int, blocks: range, hidden: torch.Tensor
    ) -> Result:
        """One forward on the current connection. WorkerLost if it is (or goes) away;
        WorkerError if the worker refused or failed this request (that session only)."""

        def request(request_id: int) -> Forward:
            return Forward(
                id=request_id,
                session=session,
                start_pos=start_pos,
                blocks=tuple(blocks),
                hidden=hidden,
            )

        reply = await self._request(request, hidden.shape[1])
        assert isinstance(reply, Result)
        return reply

    async def forward_batch(
        self,
        sessions: tuple[str, ...],
        start_positions: tuple[int, ...],
        lengths: tuple[int, ...],
        blocks: range,
        hidden: torch.Tensor,
    ) -> BatchResult:
        """One frame for several sessions' rows through `blocks` (see ForwardBatch): the
        worker refuses a session alone, in the reply's `failed`."""

        def request(request_id: int) -> ForwardBatch:
            return ForwardBatch(
                id=request_id,
                sessions=sessions,
                start_positions=start_positions,
                lengths=lengths,
                blocks=tuple(blocks),
                hidden=hidden,
            )

        reply = await self._request(request, hidden.shape[1])
        assert isinstance(reply, BatchResult)
        return reply

    async def fork_session(self, session: str, parent: str, length: int, move: bool) -> None:
        """Open `session` on the worker from the cached `parent`'s first `length` positions
        (see ForkSession). WorkerError if the worker no longer holds the parent."""

        def request(request_id: int) -> ForkSession:
            return ForkSession(
                id=request_id, session=session, parent=parent, length=length, move=move
            )

        reply = await self._request(request, 1)  # a copy of caches: about a decode step
        assert isinstance(reply, SessionForked)

    async def _request(
        self, request: Callable[[int], Forward | ForwardBatch | ForkSession], positions: int
    ) -> Message:
        """The reply to `request` on the current connection; an error reply as WorkerError."""
        channel = self._live_channel()
        if channel is None:
            raise WorkerLost(f"{self.label}: not connected")
        reply = await channel.request(request, positions=positions)
        if isinstance(reply, ErrorMessage):
            raise WorkerError(f"{self.label} failed a request: {reply.message}")
        return reply

    async def close_session(self, session: str, keep: bool = False) -> None:
        """Free the session's caches on the worker, or with `keep` keep them as a cached
        prefix; while it is not up they went already."""
        channel = self._live_channel()
        if channel is not None:
            with contextlib.suppress(LinkError):
                await channel.send(CloseSession(session=session, keep=keep))

    async def close(self) -> None:
        self.closed = True
        channel, self.channel = self.channel, None
        if channel is not None:
            await channel.close()
