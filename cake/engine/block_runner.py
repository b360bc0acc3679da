"""The one block runner: consecutive blocks of a model part, for the rows of several sessions.

The master's local stages and every worker run blocks the same way, in three moves:

    admit    each row's session (opened if new, positions checked and claimed in the session
             store, on the event loop: a refusal fails that row only)
    run      every admitted row in one pass (the linear layers on all rows, attention per
             session against its own caches; one row takes the one-session path), on whatever
             thread computes
    release  the claims, so the store may evict or close those sessions again
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from cake.engine.session_store import Session, SessionStore
from cake.errors import CakeError, Code
from cake.host.memory import release_free_memory
from cake.model.kv_cache import Segment
from cake.model.llama import Llama


@dataclass(frozen=True)
class Claim:
    """An admitted row: positions start_pos..start_pos+length-1 of `session`."""

    session: Session
    start_pos: int
    length: int


class BlockRunner:
    def __init__(self, model: Llama, store: SessionStore, trim_after: int | None = None) -> None:
        """`trim_after`: after a pass of at least this many rows, give freed heap memory back
        (a prefill's activations; a worker does, see host.memory.release_free_memory)."""
        self.model = model
        self.store = store
        self.served = frozenset(model.blocks)
        self.trim_after = trim_after

    def check_blocks(self, blocks: Sequence[int], owner: str) -> None:
        missing = [b for b in blocks if b not in self.served]
        if missing:
            raise CakeError(
                Code.UNKNOWN_BLOCK,
                f"{owner} does not serve block(s) {missing}; it serves {self.model.blocks}",
            )

    def admit(
        self,
        key: Hashable,
        start_pos: int,
        length: int,
        blocks: Sequence[int],
        label: str,
        opens_for: Sequence[int] | None = None,
    ) -> Claim:
        """One row's claim, or a CakeError refusing it (see SessionStore.admit)."""
        session = self.store.admit(key, start_pos, length, blocks, label, opens_for)
        return Claim(session, start_pos, length)

    def run(
        self, hidden: torch.Tensor, claims: Sequence[Claim], blocks: Sequence[int]
    ) -> torch.Tensor:
        """hidden (1, sum of the claims' lengths, C), the rows in claim order, through
        `blocks`: (1, same rows, C) on the part's device, in its dtype."""
        segments, offset = [], 0
        for claim in claims:
            segments.append(Segment(claim.session.caches, claim.start_pos, offset, claim.length))
            offset += claim.length
        with torch.inference_mode():
            x = hidden.to(device=self.model.device, dtype=self.model.dtype)
            out = self.model.run_segments(x, segments, blocks)
        if self.trim_after is not None and offset >= self.trim_after:
            release_free_memory()  # a prefill's large activations: back to the system
        return out

    def release(self, claims: Sequence[Claim]) -> None:
        for claim in claims:
            self.store.release(claim.session)
