"""A stage is one maximal run of consecutive blocks, run in one go: here, or on a worker.

The master passes the hidden states through its stages in block order. Each session (one
generation) has its own KV caches in every stage, so sessions never see each other's state; a
forward that starts before a session's end first rolls it back there (on the master's store and
on each worker's).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from cake.engine.block_runner import BlockRunner, Claim
from cake.engine.compute import MasterCompute
from cake.errors import CakeError


@dataclass
class StageTimes:
    """Where one stage's time went, summed over the steps of a generation."""

    compute_s: float = 0.0  # tensor work (for a remote stage: the worker's own report)
    wire_s: float = 0.0  # encode + network + decode (remote stages only)
    round_trips: int = 0


@dataclass(frozen=True)
class StageRow:
    """One session's positions in a step through a stage: rows of the step's hidden states."""

    session_id: str
    start_pos: int
    length: int
    times: StageTimes  # that session's account of the stage's time


@dataclass
class StageOutcome:
    """What a stage gives back for a step: the rows of every session that did not fail (in
    order), and the sessions (by row index) that failed, with why."""

    hidden: torch.Tensor  # (1, rows of the sessions that went through, C)
    failed: dict[int, Exception] = field(default_factory=dict)


@dataclass(frozen=True)
class StageHealth:
    """Whether a stage can serve now, as the API's /health reports it."""

    label: str
    blocks: range
    up: bool
    worker: str | None = None  # a remote stage's worker name and address
    address: str | None = None


class Stage(Protocol):
    """Consecutive blocks run in one go, here or on a worker: everything the engine's callers
    need to know of a stage, so that none of them asks for a concrete class."""

    label: str  # "master" or the worker's name
    blocks: range
    remote: bool  # a worker runs it: each step costs a round trip

    async def forward(self, rows: Sequence[StageRow], hidden: torch.Tensor) -> StageOutcome:
        """Every row's session in one pass: hidden (1, sum of lengths, C). A session the stage
        refuses (budget, context) fails alone; the others go through."""
        ...

    async def rollback(self, session_id: str, length: int) -> None:
        """Keep positions 0..length-1 of the session only (speculative decoding's rejected
        drafts). The next forward starts at `length`; nothing beyond it is attended again."""
        ...

    async def fork_session(
        self, session_id: str, parent_id: str, length: int, move: bool = False
    ) -> None:
        """Open the session with a copy of the cached `parent_id`'s positions 0..length-1
        (cake/engine/prefix_cache.py), or with `move` with the parent's own caches (the parent
        is gone then); a CakeError or WorkerError when the stage no longer holds that prefix
        (the master then computes it again)."""
        ...

    async def close_session(self, session_id: str, keep: bool = False) -> None:
        """The master is done with the session: free its caches, or with `keep` keep them as
        a cached prefix that later sessions fork from."""
        ...

    async def health(self) -> StageHealth: ...

    def expert_load(self) -> list[int]:
        """Rows each expert of the stage's mixture-of-experts blocks took so far (expert i at
        index i, summed over its blocks); empty for dense blocks."""
        ...

    async def retire(self) -> None:
        """A re-plan replaces this stage: what is in flight ends with StagesReplaced, and its
        resources go (a worker's connection closes, so the worker can take a new assignment)."""
        ...

    async def close(self) -> None: ...


class LocalStage:
    """Blocks that run in the master's own process, through the part's block runner; their KV
    caches live in the master's store.

    Sessions are keyed (first block, session id), so two local runs of one generation (the
    first and the last blocks, say) hold separate caches in the one store.
    """

    def __init__(self, runner: BlockRunner, blocks: range, compute: MasterCompute) -> None:
        self.label = "master"
        self.remote = False
        self.runner = runner
        self.blocks = blocks
        self.compute = compute  # inline, or on a thread when many sessions share the master

    def _key(self, session_id: str) -> tuple[int, str]:
        return (self.blocks.start, session_id)

    def expert_load(self) -> list[int]:
        load = self.runner.model.expert_load(self.blocks)
        return [] if load is None else load.tolist()

    async def forward(self, rows: Sequence[StageRow], hidden: torch.Tensor) -> StageOutcome:
        started = time.perf_counter()
        claims: list[Claim] = []
        kept: list[StageRow] = []
        pieces: list[torch.Tensor] = []
        failed: dict[int, Exception] = {}
        offset = 0
        for index, row in enumerate(rows):
            try:
                claim = self.runner.admit(
                    self._key(row.session_id),
                    row.start_pos,
                    row.length,
                    self.blocks,
                    row.session_id[:8],
                    opens_for=self.blocks,
                )
            except CakeError as exc:  # the store's refusal of this session
                failed[index] = exc
            else:
                claims.append(claim)
                kept.append(row)
                pieces.append(hidden[:, offset : offset + row.length])
            offset += row.length
        if not kept:
            return StageOutcome(hidden[:, :0], failed)
        if failed:
            hidden = torch.cat(pieces, dim=1)
        try:
            out = await self.compute(self.runner.run, hidden, claims, self.blocks)
        finally:
            self.runner.release(claims)
        elapsed = time.perf_counter() - started
        for row in kept:
            row.times.compute_s += elapsed
        return StageOutcome(out, failed)

    async def rollback(self, session_id: str, length: int) -> None:
        """Forget positions >= length of this session (see SessionStore.rollback)."""
        store = self.runner.store
        session = store.get(self._key(session_id))
        if session is not None:
            store.rollback(session, length)

    async def fork_session(
        self, session_id: str, parent_id: str, length: int, move: bool = False
    ) -> None:
        store = self.runner.store
        store.fork(self._key(parent_id), self._key(session_id), length, parent_id[:8], move)

    async def close_session(self, session_id: str, keep: bool = False) -> None:
        if keep:
            self.runner.store.retain(self._key(session_id))
        else:
            self.runner.store.close(self._key(session_id))

    async def health(self) -> StageHealth:
        return StageHealth(self.label, self.blocks, up=True)

    async def retire(self) -> None:
        await self.close()  # the master's own caches of these blocks go

    async def close(self) -> None:
        self.runner.store.close_where(lambda key: key[0] == self.blocks.start)
