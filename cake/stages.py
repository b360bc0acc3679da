"""A stage is one maximal run of consecutive blocks, run in one go: here, or on a worker.

The master passes the hidden states through its stages in block order. Each session (one
generation) has its own KV caches in every stage, so sessions never see each other's state.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from cake.model import Llama, SessionCache


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

    async def rollback(self, session_id: str, length: int) -> None:
        """Keep positions 0..length-1 of the session only (speculative decoding's rejected
        drafts). The next forward starts at `length`; nothing beyond it is attended again."""
        ...

    async def close_session(self, session_id: str) -> None: ...

    async def close(self) -> None: ...


class LocalStage:
    """Blocks that run in the master's own process."""

    def __init__(
        self, model: Llama, blocks: range, max_seq_len: int, offload: bool = False
    ) -> None:
        self.label = "master"
        self.model = model
        self.blocks = blocks
        self.max_seq_len = max_seq_len
        # With several sessions at once (the HTTP API), tensor work runs in a thread so the
        # event loop keeps serving; a single CLI generation runs it inline (no thread hop).
        self.offload = offload
        self.caches: dict[str, SessionCache] = {}

    def _run(self, session_id: str, hidden: torch.Tensor, start_pos: int) -> torch.Tensor:
        cache = self.caches.get(session_id)
        if cache is None:
            cache = self.caches[session_id] = self.model.new_cache(self.max_seq_len, self.blocks)
        with torch.inference_mode():
            return self.model.run_blocks(hidden, start_pos, cache, self.blocks)

    async def forward(
        self, session_id: str, hidden: torch.Tensor, start_pos: int, times: StageTimes
    ) -> torch.Tensor:
        started = time.perf_counter()
        if self.offload:
            out = await asyncio.to_thread(self._run, session_id, hidden, start_pos)
        else:
            out = self._run(session_id, hidden, start_pos)
        times.compute_s += time.perf_counter() - started
        return out

    async def rollback(self, session_id: str, length: int) -> None:
        # The static caches are written at explicit positions and attention reads keys only up
        # to the last position written, so the next forward (at `length`) overwrites the
        # rejected positions and never reads past them: nothing to free here.
        pass

    async def close_session(self, session_id: str) -> None:
        self.caches.pop(session_id, None)

    async def close(self) -> None:
        self.caches.clear()
