"""A stage is one maximal run of consecutive blocks, run in one go: here, or on a worker.

The master passes the hidden states through its stages in block order. Each session (one
generation) has its own KV caches in every stage, so sessions never see each other's state; a
forward that starts before a session's end first rolls it back there (on the master's store and
on each worker's).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from cake.engine.sessions import Session, SessionStore
from cake.errors import CakeError
from cake.model.kv_cache import Segment
from cake.model.llama import Llama


@dataclass
class StageTimes:
    """Where one stage's time went, summed over the steps of a generation."""

    compute_s: float = 0.0  # tensor work (for a remote stage: the worker's own report)
    wire_s: float = 0.0  # encode + network + decode (remote stages only)
    round_trips: int = 0


@dataclass
class BatchRow:
    """One session's rows in a batched step through a stage."""

    session_id: str
    start_pos: int
    length: int
    times: StageTimes  # that session's account of the stage's time


@dataclass
class BatchOutcome:
    """What a stage gives back for a batched step: the rows of every session that did not fail
    (in order), and the sessions (by row index) that failed, with why."""

    hidden: torch.Tensor  # (1, rows of the sessions that went through, C)
    failed: dict[int, Exception] = field(default_factory=dict)


class Stage(Protocol):
    label: str  # "master" or the worker's name
    blocks: range

    async def forward(
        self, session_id: str, hidden: torch.Tensor, start_pos: int, times: StageTimes
    ) -> torch.Tensor: ...

    async def forward_batch(
        self, rows: Sequence[BatchRow], hidden: torch.Tensor
    ) -> BatchOutcome: ...

    async def rollback(self, session_id: str, length: int) -> None:
        """Keep positions 0..length-1 of the session only (speculative decoding's rejected
        drafts). The next forward starts at `length`; nothing beyond it is attended again."""
        ...

    async def close_session(self, session_id: str) -> None: ...

    async def close(self) -> None: ...


class LocalStage:
    """Blocks that run in the master's own process; their KV caches live in the master's store.

    Sessions are keyed (first block, session id), so two local runs of one generation (the
    first and the last blocks, say) hold separate caches in the one store.
    """

    def __init__(
        self, model: Llama, blocks: range, store: SessionStore, offload: bool = False
    ) -> None:
        self.label = "master"
        self.model = model
        self.blocks = blocks
        self.store = store
        # With several sessions at once (the HTTP API), tensor work runs in a thread so the
        # event loop keeps serving; a single CLI generation runs it inline (no thread hop).
        self.offload = offload

    def _key(self, session_id: str) -> tuple[int, str]:
        return (self.blocks.start, session_id)

    def _run(self, session: Session, hidden: torch.Tensor, start_pos: int) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.run_blocks(hidden, start_pos, session.caches, self.blocks)

    async def forward(
        self, session_id: str, hidden: torch.Tensor, start_pos: int, times: StageTimes
    ) -> torch.Tensor:
        started = time.perf_counter()
        key = self._key(session_id)
        session = self.store.get(key) or self.store.open(key, self.blocks)
        self.store.claim(session, start_pos, hidden.shape[1])  # a start before the end rolls back
        try:
            if self.offload:
                out = await asyncio.to_thread(self._run, session, hidden, start_pos)
            else:
                out = self._run(session, hidden, start_pos)
        finally:
            self.store.release(session)
        times.compute_s += time.perf_counter() - started
        return out

    async def rollback(self, session_id: str, length: int) -> None:
        """Forget positions >= length of this session (see SessionStore.rollback)."""
        session = self.store.get(self._key(session_id))
        if session is not None:
            self.store.rollback(session, length)

    def _run_batch(
        self, sessions: Sequence[Session], rows: Sequence[BatchRow], hidden: torch.Tensor
    ) -> torch.Tensor:
        segments, offset = [], 0
        for session, row in zip(sessions, rows, strict=True):
            segments.append(Segment(session.caches, row.start_pos, offset, row.length))
            offset += row.length
        with torch.inference_mode():
            return self.model.run_segments(hidden, segments, self.blocks)

    async def forward_batch(self, rows: Sequence[BatchRow], hidden: torch.Tensor) -> BatchOutcome:
        """Every row's session in one pass; a session the store refuses (budget, context)
        fails alone and the others go through."""
        started = time.perf_counter()
        sessions: list[Session] = []
        kept: list[BatchRow] = []
        pieces: list[torch.Tensor] = []
        failed: dict[int, Exception] = {}
        offset = 0
        for index, row in enumerate(rows):
            key = self._key(row.session_id)
            try:
                session = self.store.get(key) or self.store.open(key, self.blocks)
                self.store.claim(session, row.start_pos, row.length)
            except CakeError as exc:  # the store's refusal of this session
                failed[index] = exc
            else:
                sessions.append(session)
                kept.append(row)
                pieces.append(hidden[:, offset : offset + row.length])
            offset += row.length
        if not kept:
            return BatchOutcome(hidden[:, :0], failed)
        if failed:
            hidden = torch.cat(pieces, dim=1)
        try:
            if self.offload:
                out = await asyncio.to_thread(self._run_batch, sessions, kept, hidden)
            else:
                out = self._run_batch(sessions, kept, hidden)
        finally:
            for session in sessions:
                self.store.release(session)
        elapsed = time.perf_counter() - started
        for row in kept:
            row.times.compute_s += elapsed
        return BatchOutcome(out, failed)

    async def close_session(self, session_id: str) -> None:
        self.store.close(self._key(session_id))

    async def close(self) -> None:
        self.store.close_where(lambda key: key[0] == self.blocks.start)
