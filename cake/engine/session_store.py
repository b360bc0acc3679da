"""The session store: the one place in a process (master or worker) where sessions live.

A session is one sequence of one master (a generation, a perplexity window). For the blocks this
process runs, it owns the session's KV caches (`cake.model.kv_cache.KVCache`, one per block),
and this store owns every session's lifetime in this process:

* **open** lazily, on the session's first positions;
* **claim** the positions a forward writes: checks they follow on from what the session holds,
  rolls back first when they start earlier, and reserves room for them under the byte budget;
* **rollback** to a position: later positions are never attended again (speculative decoding
  throws away rejected drafts this way; a forward that starts earlier does it implicitly);
* **close** when the master is done, or with the connection that owned it;
* **evict** sessions left idle longer than `idle_timeout_s`, oldest first, when room is short
  and whenever a session opens;
* **retain** a finished session as a cached prefix (the master's prefix cache,
  cake/engine/prefix_cache.py): it is never written again, new sessions **fork** from it (a
  copy of its first positions), and when room or a session slot is short, cached sessions go
  first, least recently used, before anything is refused.

Memory is counted in whole pages of positions (`page`, 64 by default), the unit the caches grow
by, so what the store reserves is exactly what the caches allocate once written, and a 5-token
request costs one page, not `max_seq_len`. A claim that would pass the budget raises a
`CakeError` with a session-refusal code (cake.errors.SESSION_REFUSALS), for that session only.
Bookkeeping happens on the caller's thread (the worker's event loop, the master's generation);
only the cache tensors are written by the compute thread, within the capacity reserved here. A
lock keeps the bookkeeping whole if threads do share it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from cake.errors import CakeError, Code, WorkerError
from cake.host.devices import DTYPES
from cake.host.memory import device_memory
from cake.host.sizes import format_size, parse_size
from cake.model.kv_cache import SessionCache, paged_capacity
from cake.model.llama import Llama
from cake.topology import format_blocks

if TYPE_CHECKING:
    from cake.model.config import LlamaConfig
    from cake.wire.protocol import Welcome


DEFAULT_PAGE = 64  # positions per page: what a short session costs per block
DEFAULT_KV_SHARE = 0.5  # default --kv-memory: this share of the memory free after loading


def kv_budget(option: str | None, device: torch.device) -> int:
    """--kv-memory: a size, a share of free memory ('50%'), or by default DEFAULT_KV_SHARE."""
    if option is None:
        return int(device_memory(device).free * DEFAULT_KV_SHARE)
    text = option.strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1]) / 100
        except ValueError:
            share = -1.0
        if not 0 < share <= 1:
            raise ValueError(f"--kv-memory {option!r}: a share must be between 0% and 100%")
        return int(device_memory(device).free * share)
    return parse_size(text, "--kv-memory")


def kv_bytes_per_position(n_blocks: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one position of keys and values costs over `n_blocks` blocks."""
    return n_blocks * 2 * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class Session:
    key: Hashable
    blocks: tuple[int, ...]
    caches: SessionCache
    length: int = 0  # positions 0..length-1 are written, or being written by a claimed forward
    capacity: int = 0  # positions reserved under the budget (whole pages)
    busy: int = 0  # claimed forwards not yet released: never evicted while > 0
    cached: bool = False  # finished, kept as a prefix to fork from: evicted first (LRU)
    # block -> positions 0..end-1 of that block's cache claimed so far: a forward through some
    # of the session's blocks (a worker serving two runs) must not skip positions of any.
    block_ends: dict[int, int] = field(default_factory=dict)
    last_used: float = field(default_factory=time.monotonic)
    # Orders one session's forwards on a worker (created unbound; asyncio binds it on first use).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class SessionStore:
    """Every session's KV caches in this process, under one byte budget."""

    def __init__(
        self,
        model: Llama,
        blocks: Sequence[int],
        max_seq_len: int,
        budget_bytes: int,
        *,
        max_sessions: int | None = None,
        idle_timeout_s: float | None = None,
        page: int = DEFAULT_PAGE,
        owner: str = "this process",
    ) -> None:
        self.model = model
        self.blocks = tuple(blocks)
        self.max_seq_len = max_seq_len
        self.budget_bytes = budget_bytes
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self.page = page
        self.owner = owner  # for messages: "worker w1", "the master"
        self.block_position_bytes = kv_bytes_per_position(
            1,
            model.config.n_kv_heads,
            model.config.head_dim,
            model.dtype,  # compute dtype
        )
        self.reserved_bytes = 0
        self._sessions: dict[Hashable, Session] = {}
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, key: Hashable) -> Session | None:
        return self._sessions.get(key)

    def keys(self) -> list[Hashable]:
        return list(self._sessions)

    def full_session_bytes(self, n_blocks: int | None = None) -> int:
        """What one session at the full context costs (over all of this store's blocks)."""
        n = len(self.blocks) if n_blocks is None else n_blocks
        return paged_capacity(self.max_seq_len, self.page, self.max_seq_len) * (
            n * self.block_position_bytes
        )

    def tensor_bytes(self) -> int:
        """Bytes the caches' tensors really hold right now (<= reserved_bytes)."""
        with self._lock:
            return sum(c.nbytes for s in self._sessions.values() for c in s.caches.values())

    def check_fits_one_session(self) -> None:
        """Refuse a budget that cannot hold even one session at the full context."""
        need = self.full_session_bytes()
        if need > self.budget_bytes:
            raise ValueError(
                f"--kv-memory {format_size(self.budget_bytes)} cannot hold one session of "
                f"{self.max_seq_len} positions for blocks {format_blocks(list(self.blocks))} of "
                f"{self.owner} (that needs {format_size(need)}): raise --kv-memory or lower "
                "--max-seq-len"
            )

    # ------------------------------------------------------------------ lifetime

    def cached_count(self) -> int:
        return sum(session.cached for session in self._sessions.values())

    def open(self, key: Hashable, blocks: Sequence[int] | None = None) -> Session:
        """A new, empty session (no memory yet) for `blocks` (default: all of this store's)."""
        with self._lock:
            if key in self._sessions:
                raise ValueError(f"session {key!r} is already open")
            self.evict_idle()
            if self.max_sessions is not None and len(self._sessions) >= self.max_sessions:
                self._evict_cached(lambda: len(self._sessions) < self.max_sessions)
            if self.max_sessions is not None and len(self._sessions) >= self.max_sessions:
                raise CakeError(
                    Code.TOO_MANY_SESSIONS,
                    f"{self.owner} already holds {self.max_sessions} sessions (--max-sessions)",
                )
            run = tuple(self.blocks if blocks is None else blocks)
            caches = self.model.new_cache(self.max_seq_len, run, page=self.page)
            session = self._sessions[key] = Session(key, run, caches)
            return session

    def admit(
        self,
        key: Hashable,
        start_pos: int,
        length: int,
        blocks: Sequence[int],
        label: str,
        opens_for: Sequence[int] | None = None,
    ) -> Session:
        """The session of one row, positions start_pos..start_pos+length-1 through `blocks`:
        opened if new (for `opens_for`, default all of this store's blocks), claimed (release it
        after the compute), or a CakeError that refuses this row only. `label` names the
        session in messages."""
        if length == 0:
            raise CakeError(Code.BAD_SHAPE, "hidden states hold no positions (T = 0)")
        session = self.get(key)
        if session is None and start_pos > 0:
            evicted = (
                f", evicted after idling {self.idle_timeout_s:g}s"
                if self.idle_timeout_s is not None
                else ""
            )
            raise CakeError(
                Code.UNKNOWN_SESSION,
                f"session {label} is unknown to {self.owner} (a new session starts at position "
                f"0); it was closed{evicted}, or the worker restarted",
            )
        if session is not None:
            behind = [b for b in blocks if session.block_ends.get(b, 0) < start_pos]
            if behind:  # those caches hold nothing at the positions this forward attends to
                raise CakeError(
                    Code.BAD_POSITION,
                    f"start_pos {start_pos} skips positions of session {label} in block(s) "
                    f"{behind}: they hold {[session.block_ends.get(b, 0) for b in behind]}",
                )
        opened = session is None
        try:
            if session is None:
                session = self.open(key, opens_for)
            # Reserves the positions now, so the next step's check (which may come before
            # this one's compute ends) sees them; a start before the end rolls back first.
            self.claim(session, start_pos, length)
        except CakeError as exc:  # budget, context, session count
            if opened and session is not None:
                self.close(key)
            raise CakeError(exc.code, f"session {label}: {exc}") from None
        for block in blocks:
            session.block_ends[block] = start_pos + length
        return session

    def claim(self, session: Session, start_pos: int, n_positions: int) -> None:
        """Positions start_pos..start_pos+n_positions-1 are about to be written.

        Rolls back first if start_pos is before the session's end, reserves room for them, and
        marks the session busy until `release`. A CakeError (a session refusal) if they do
        not fit.
        """
        end = start_pos + n_positions
        with self._lock:
            if end > self.max_seq_len:
                raise CakeError(
                    Code.CONTEXT_FULL,
                    f"positions {start_pos}..{end - 1} do not fit the context of "
                    f"{self.max_seq_len} positions of {self.owner} (--max-seq-len)",
                )
            if start_pos > session.length:
                raise CakeError(
                    Code.BAD_POSITION,
                    f"start_pos {start_pos} skips positions: the session holds {session.length}",
                )
            self._reserve(session, end)
            session.length = end  # any positions past end are rolled back
            session.busy += 1
            session.last_used = time.monotonic()

    def release(self, session: Session) -> None:
        """A claimed forward finished (or failed)."""
        with self._lock:
            session.busy = max(session.busy - 1, 0)
            session.last_used = time.monotonic()

    def rollback(self, session: Session, length: int) -> None:
        """Keep positions 0..length-1; later ones are never attended again (their pages stay
        reserved for the positions that follow)."""
        with self._lock:
            if not 0 <= length <= session.length:
                raise ValueError(
                    f"cannot roll back to {length}: the session holds {session.length} positions"
                )
            session.length = length
            session.last_used = time.monotonic()

    def retain(self, key: Hashable) -> bool:
        """Keep a finished session as a cached prefix (see the module docstring); False if it
        was not open."""
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                return False
            session.cached = True
            session.last_used = time.monotonic()
            return True

    def fork(
        self, parent_key: Hashable, key: Hashable, length: int, label: str, move: bool = False
    ) -> Session:
        """Open session `key` holding a copy of positions 0..length-1 of the cached session
        `parent_key`, under the budget; its next forward starts at `length`. With `move` the
        new session takes the parent's caches instead (no copy, no extra memory) and the
        parent is gone: what the master asks when the new session holds all the parent's
        tokens. A CakeError when the parent is not held (evicted, closed, a restart) or room
        is short."""
        with self._lock:
            parent = self._sessions.get(parent_key)
            if parent is None or not parent.cached:
                raise CakeError(
                    Code.UNKNOWN_SESSION,
                    f"the cached prefix {label} is not held by {self.owner} (evicted to make "
                    "room, closed, or the worker restarted)",
                )
            held = min((parent.block_ends.get(b, 0) for b in parent.blocks), default=0)
            if length > min(held, parent.length):
                raise CakeError(
                    Code.BAD_POSITION,
                    f"the cached prefix {label} holds {min(held, parent.length)} positions on "
                    f"{self.owner}, not the {length} asked for",
                )
            if move:
                if key in self._sessions:
                    raise ValueError(f"session {key!r} is already open")
                del self._sessions[parent_key]
                session = self._sessions[key] = Session(
                    key, parent.blocks, parent.caches, length=length, capacity=parent.capacity
                )
                session.block_ends = dict.fromkeys(session.blocks, length)
                return session
            parent.busy += 1  # not evicted to make room for its own copy
            try:
                session = self.open(key, parent.blocks)
                try:
                    self._reserve(session, length)
                except CakeError:
                    self.close(key)
                    raise
            finally:
                parent.busy -= 1
            session.length = length
            session.block_ends = dict.fromkeys(session.blocks, length)
            parent.last_used = session.last_used = time.monotonic()
            for block, cache in session.caches.items():
                cache.copy_prefix(parent.caches[block], length)
            return session

    def close(self, key: Hashable) -> bool:
        """Free a session's caches; False if it was not open."""
        with self._lock:
            session = self._sessions.pop(key, None)
            if session is None:
                return False
            # The caches are not cleared here: a forward still on the compute thread keeps
            # them until it ends, then they are freed with the session.
            self.reserved_bytes -= self._bytes(session, session.capacity)
            return True

    def close_where(self, predicate: Callable[[Hashable], bool]) -> int:
        with self._lock:
            doomed = [key for key in self._sessions if predicate(key)]
            for key in doomed:
                self.close(key)
            return len(doomed)

    def close_all(self) -> None:
        self.close_where(lambda _key: True)

    def evict_idle(self, now: float | None = None) -> list[Hashable]:
        """Close sessions idle longer than idle_timeout_s (none busy); their keys."""
        if self.idle_timeout_s is None:
            return []
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [
                key
                for key, s in self._sessions.items()
                if not s.busy and now - s.last_used > self.idle_timeout_s
            ]
            for key in stale:
                self.close(key)
            return stale

    def _evict_cached(self, enough: Callable[[], bool]) -> None:
        """Close cached prefixes, least recently used first, until `enough()` (or none is
        left that no forward or fork is using)."""
        with self._lock:
            cached = sorted(
                (s for s in self._sessions.values() if s.cached and not s.busy),
                key=lambda s: s.last_used,
            )
            for session in cached:
                if enough():
                    return
                self.close(session.key)

    # ------------------------------------------------------------------ memory

    def _bytes(self, session: Session, positions: int) -> int:
        return positions * len(session.blocks) * self.block_position_bytes

    def _reserve(self, session: Session, end: int) -> None:
        capacity = paged_capacity(end, self.page, self.max_seq_len)
        extra = self._bytes(session, capacity - session.capacity)
        if extra <= 0:
            return
        if self.reserved_bytes + extra > self.budget_bytes:
            self.evict_idle()
        if self.reserved_bytes + extra > self.budget_bytes:
            self._evict_cached(lambda: self.reserved_bytes + extra <= self.budget_bytes)
        if self.reserved_bytes + extra > self.budget_bytes:
            others = len(self._sessions) - 1
            raise CakeError(
                Code.KV_MEMORY_FULL,
                f"{self.owner} has no KV memory left for positions {session.length}..{end - 1} "
                f"of blocks {format_blocks(list(session.blocks))}: they need "
                f"{format_size(extra)} more, {format_size(self.budget_bytes - self.reserved_bytes)}"
                f" of its {format_size(self.budget_bytes)} budget is free, {others} other "
                "session(s) hold the rest (--kv-memory, or fewer concurrent sessions)",
            )
        self.reserved_bytes += extra
        session.capacity = capacity


def check_worker_limits(
    label: str, welcome: Welcome, config: LlamaConfig, max_seq_len: int
) -> None:
    """Refuse, at connect time, a worker whose session store cannot hold one session of the
    master's context: its --max-seq-len is shorter, or its --kv-memory too small."""
    if welcome.max_seq_len and welcome.max_seq_len < max_seq_len:
        raise WorkerError(
            f"{label} holds {welcome.max_seq_len} positions per session (its --max-seq-len), "
            f"but the master's context is {max_seq_len}: start the worker with --max-seq-len "
            f"{max_seq_len} or more, or give the master --max-seq-len {welcome.max_seq_len}"
        )
    dtype = DTYPES.get(welcome.dtype)
    if not welcome.kv_memory or dtype is None:
        return
    per_position = kv_bytes_per_position(
        len(welcome.blocks), config.n_kv_heads, config.head_dim, dtype
    )
    need = paged_capacity(max_seq_len, DEFAULT_PAGE, max_seq_len) * per_position
    if welcome.kv_memory < need:
        raise WorkerError(
            f"{label} has {format_size(welcome.kv_memory)} of KV memory (its --kv-memory), "
            f"less than one session of the master's {max_seq_len} positions needs on its "
            f"{len(welcome.blocks)} blocks ({format_size(need)}): raise the worker's --kv-memory "
            "or lower the master's --max-seq-len"
        )
