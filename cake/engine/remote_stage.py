"""A run of blocks on a worker, seen from the master: one round trip per step, and a replay
after the worker was lost.

Its `WorkerClient` (cake/wire/worker_link.py) keeps one channel to the worker, shared by the
worker's stages and every session, and tracks the worker's phase (cake/wire/liveness.py):
connected -> lost -> replaying -> connected.

A worker whose connection breaks, or that stops answering (a frozen process, a powered-off or
partitioned host: caught by the heartbeat or a request's deadline), loses every session's KV
caches as far as we know. The master then reconnects with backoff until `retry_timeout` seconds
after the worker was last heard and, per session, replays the hidden states that stage has
received so far (kept by `RemoteStage`), which rebuilds exactly the lost caches without running
the other stages again; then it carries on, and the text is the same as without the fault.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from cake.engine.stages import StageHealth, StageOutcome, StageRow, StageTimes
from cake.errors import StagesReplaced, WorkerError, WorkerLost
from cake.wire.protocol import host_tensor
from cake.wire.worker_link import WorkerClient

R = TypeVar("R")

log = logging.getLogger(__name__)


@dataclass
class SessionInputs:
    """The hidden states a stage has received for one session, in position order, one chunk
    per forward as it was sent: a replay sends them the same way, so the worker computes the
    same products and rebuilds the caches bit for bit (quantized kernels round a many-row
    product differently from one row: a replay in 512-position chunks changed a greedy text
    ~100 tokens after the fault)."""

    chunks: list[torch.Tensor] = field(default_factory=list)  # each (1, T_i, C), on the CPU
    # (the rows as they were sent: RemoteStage.forward copies them to the host once)
    length: int = 0

    def add(self, start_pos: int, hidden: torch.Tensor) -> None:
        self.truncate(start_pos)  # a forward at start_pos replaces everything from there on
        self.chunks.append(hidden)
        self.length += hidden.shape[1]

    def truncate(self, length: int) -> None:
        """Keep positions 0..length-1 (a rewind or a rollback), so a replay never rebuilds
        positions the master has dropped."""
        while self.length > length:
            last = self.chunks[-1]
            extra = self.length - length
            if last.shape[1] <= extra:
                self.chunks.pop()
                self.length -= last.shape[1]
            else:
                self.chunks[-1] = last[:, : last.shape[1] - extra]
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
        self.remote = True
        self.inputs: dict[str, SessionInputs] = {}
        self.retired = False  # a re-plan replaced this stage: its requests fail, none retry
        self.expert_rows: list[int] = []  # rows each expert took, from the worker's replies

    def expert_load(self) -> list[int]:
        return list(self.expert_rows)

    def _key(self, session_id: str) -> tuple[int, str]:
        """This stage's caches of a session, as the worker's phase tracks them."""
        return (self.blocks.start, session_id)

    async def _send(
        self, sessions: Sequence[tuple[str, StageTimes]], request: Callable[[], Awaitable[R]]
    ) -> tuple[R, float]:
        """`request()` on a connected worker that holds every one of `sessions`' caches: when
        the worker was lost, reconnect (until --retry-timeout after it was last heard) and
        replay what each session had sent it, then send again. (reply, seconds it took)."""
        client = self.client
        needed_since = time.monotonic()
        deadline: float | None = None
        while True:
            try:
                if self.retired:
                    raise StagesReplaced(f"{client.label}: the cluster was re-planned")
                if not client.is_up:
                    deadline = deadline or client.retry_deadline(needed_since)
                    await client.ensure_connected(deadline)
                for session_id, times in sessions:
                    key = self._key(session_id)
                    if client.phase.needs_replay(key):
                        inputs = self.inputs.setdefault(session_id, SessionInputs())
                        await self._replay(session_id, inputs, times)
                    client.phase.session_current(key)
                started = time.perf_counter()
                reply = await request()
                return reply, time.perf_counter() - started
            except WorkerLost as exc:
                if self.retired:
                    raise StagesReplaced(f"{client.label}: the cluster was re-planned") from None
                if client.closed:
                    raise WorkerError(f"{client.label}: the connection was closed") from None
                if deadline is None:
                    deadline = client.retry_deadline(needed_since)
                    log.warning(
                        "%s; reconnecting (until %gs after it was last heard)",
                        exc,
                        client.retry_timeout,
                    )
                elif time.monotonic() > deadline:
                    raise client.gave_up(exc) from None

    async def forward(self, rows: Sequence[StageRow], hidden: torch.Tensor) -> StageOutcome:
        """One round trip for every row's session (the worker runs them as one pass); a session
        the worker refuses fails alone. Worker loss: reconnect, replay each session of the step,
        send the step again."""
        client = self.client
        # The one copy to the host: the frame is encoded from it and the replay log keeps it.
        sent = host_tensor(hidden.detach())
        if len(rows) == 1:
            only = rows[0]
            result, elapsed = await self._send(
                [(only.session_id, only.times)],
                lambda: client.forward(only.session_id, only.start_pos, self.blocks, sent),
            )
            failed: dict[int, Exception] = {}
        else:
            result, elapsed = await self._send(
                [(row.session_id, row.times) for row in rows],
                lambda: client.forward_batch(
                    tuple(row.session_id for row in rows),
                    tuple(row.start_pos for row in rows),
                    tuple(row.length for row in rows),
                    self.blocks,
                    sent,
                ),
            )
            failed = {
                index: WorkerError(
                    f"{client.label} refused session {rows[index].session_id[:8]}: {why}"
                )
                for index, why in zip(result.failed, result.errors, strict=True)
            }
        compute = result.compute_us / 1e6
        if result.experts:
            if len(self.expert_rows) != len(result.experts):
                self.expert_rows = [0] * len(result.experts)
            self.expert_rows = [
                a + b for a, b in zip(self.expert_rows, result.experts, strict=True)
            ]
        wire = max(elapsed - compute, 0.0)
        offset = 0
        for index, row in enumerate(rows):
            row.times.round_trips += 1
            row.times.compute_s += compute
            row.times.wire_s += wire
            if index not in failed:
                inputs = self.inputs.setdefault(row.session_id, SessionInputs())
                inputs.add(row.start_pos, sent[:, offset : offset + row.length])
            offset += row.length
        return StageOutcome(result.hidden.to(device=hidden.device, dtype=hidden.dtype), failed)

    async def _replay(self, session_id: str, inputs: SessionInputs, times: StageTimes) -> None:
        """Rebuild this session's caches on a reconnected worker from the inputs it had seen,
        one forward per forward it had received (see SessionInputs)."""
        if inputs.length:
            log.info(
                "%s: replaying %d positions (%d forwards) of session %s (blocks %d-%d)",
                self.client.label,
                inputs.length,
                len(inputs.chunks),
                session_id[:8],
                self.blocks.start,
                self.blocks.stop - 1,
            )
            started = time.perf_counter()
            start = 0
            for chunk in list(inputs.chunks):
                await self.client.forward(session_id, start, self.blocks, chunk)
                times.round_trips += 1
                start += chunk.shape[1]
            log.info(
                "%s: replayed session %s in %.2fs",
                self.client.label,
                session_id[:8],
                time.perf_counter() - started,
            )
        self.client.phase.session_current(self._key(session_id))

    async def rollback(self, session_id: str, length: int) -> None:
        # No message: the worker drops positions >= start_pos of every forward it runs (see
        # protocol.Forward), so the next forward, at `length`, rolls it back in the same trip.
        inputs = self.inputs.get(session_id)
        if inputs is not None:
            inputs.truncate(length)

    async def fork_session(
        self, session_id: str, parent_id: str, length: int, move: bool = False
    ) -> None:
        """The worker copies (or moves) the cached parent's first `length` positions; the
        replay log starts as the parent's, cut there, so a replay after a loss rebuilds the
        prefix too."""
        parent = self.inputs.get(parent_id)
        if parent is None or parent.length < length:
            raise WorkerError(f"{self.client.label}: no inputs of the cached prefix to replay")
        await self._send([], lambda: self.client.fork_session(session_id, parent_id, length, move))
        if move:
            del self.inputs[parent_id]
        inputs = self.inputs[session_id] = SessionInputs(list(parent.chunks), parent.length)
        inputs.truncate(length)
        self.client.phase.session_current(self._key(session_id))

    async def close_session(self, session_id: str, keep: bool = False) -> None:
        # A kept session's inputs stay: sessions forked from it replay them after a loss.
        # It is not tracked for replay itself: a worker that lost it refuses the next fork.
        if not keep:
            self.inputs.pop(session_id, None)
        self.client.phase.session_closed(self._key(session_id))
        await self.client.close_session(session_id, keep)

    async def close(self) -> None:
        self.inputs.clear()
        await self.client.close()

    async def health(self) -> StageHealth:
        """Up when connected; a lost worker gets one reconnection attempt here, since only a
        generation that needs a worker reconnects it, and a health check that never did would
        report a restarted worker as down forever."""
        client = self.client
        if not client.is_up:
            with contextlib.suppress(WorkerError):
                await client.ensure_connected(deadline=time.monotonic())
        node = client.node
        return StageHealth(self.label, self.blocks, client.is_up, node.name, node.address)

    async def retire(self) -> None:
        """A re-plan replaces this stage: requests in flight end with StagesReplaced, and the
        connection closes (so the worker is free to take a new assignment)."""
        self.retired = True
        await self.close()
