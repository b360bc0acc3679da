"""A stage is one maximal run of consecutive blocks, run in one go: here, or on a worker.

The master passes the hidden states through its stages in block order. Each session (one
generation) has its own KV caches in every stage, so sessions never see each other's state; a
forward that starts before a session's end first rolls it back there (on the master's store and
on each worker's).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from cake.model import Llama
from cake.sessions import Session, SessionStore


@dataclass
class StageTimes:
    """Where one stage's time went, summed over the steps of a generation."""

    compute_s: float = 0.0  # tensor work (for a remote stage: the worker's own report)
    wire_s: float = 0.0  # encode + network + decode (remote stages only)
    round_trips: int = 0


class Stage(Protocol):
    label: str  # "master" or the worker's name
    blocks: range

    async def forward(
        self, session_id: str, hidden: torch.Tensor, start_pos: int, times: StageTimes
    ) -> torch.Tensor: ...

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

    def rollback(self, session_id: str, length: int) -> None:
        """Forget positions >= length of this session (see SessionStore.rollback)."""
        session = self.store.get(self._key(session_id))
        if session is not None:
            self.store.rollback(session, length)

    async def close_session(self, session_id: str) -> None:
        self.store.close(self._key(session_id))

    async def close(self) -> None:
        self.store.close_where(lambda key: key[0] == self.blocks.start)
