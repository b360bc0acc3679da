"""The master's prefix cache: finished sessions kept on every stage, found by the tokens they
hold, so a request that starts with the same tokens (the next turn of a chat, an agent's
growing history, a shared system prompt) computes only what follows them.

Each entry is a finished generation whose caches every stage kept (Stage.close_session with
`keep`: the store marks them cached, evicts them first and least recently used when its
`--kv-memory` budget or its session slots run short). A new session looks up the entry that
shares the longest prefix with its prompt, asks every stage to open it as a copy of that many
positions (Pipeline.fork_session), and runs only the rest of the prompt. A stage that no longer
holds the entry (evicted there, a restarted worker, a re-plan) refuses the fork; the entry is
then dropped and the session computes its prompt from the start, as without the cache, so the
text never depends on what was cached (only the time to the first token does).

The index lives here and nowhere else: each stage knows only that a session is kept. It holds
at most `max_entries` prefixes (the oldest is closed on every stage when one more comes), and an
entry that another one contains whole (the previous turn of the same chat) is dropped when the
longer one arrives.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_MAX_ENTRIES = 16  # kept prefixes; each also holds its replay inputs on the master
MIN_REUSED_TOKENS = 1  # reuse even one position: a fork is a copy, never slower than compute
_COMPARE_CHUNK = 64  # tokens compared per slice: C-speed equality, then one chunk token-wise


@dataclass
class CachedPrefix:
    """A finished session kept on every stage: the tokens at positions 0..len-1 of its caches,
    and how many positions each of its forwards fed (a re-plan replays a forked session's
    steps exactly as they ran, so it needs the parent's)."""

    session_id: str
    tokens: tuple[int, ...]
    forwards: tuple[int, ...]
    epoch: int  # the stages it lives on (Pipeline.epoch)
    last_used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class PrefixMatch:
    entry: CachedPrefix
    length: int  # positions of the entry the new session starts with


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    limit = min(len(a), len(b))
    start = 0
    while start < limit:
        stop = min(start + _COMPARE_CHUNK, limit)
        if a[start:stop] == b[start:stop]:
            start = stop
            continue
        while a[start] == b[start]:
            start += 1
        return start
    return limit


class PrefixCache:
    """The finished sessions kept for reuse, by the tokens they hold."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"a prefix cache holds at least one entry, got {max_entries}")
        self.max_entries = max_entries
        self._entries: dict[str, CachedPrefix] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: Sequence[int], epoch: int) -> PrefixMatch | None:
        """The entry sharing the longest prefix with `prompt` (on the stages of `epoch`), and
        how much of it to reuse: at most all but the prompt's last token, whose logits the new
        session needs."""
        prompt = tuple(prompt)
        best: PrefixMatch | None = None
        for entry in self._entries.values():
            if entry.epoch != epoch:
                continue
            length = min(common_prefix_length(entry.tokens, prompt), len(prompt) - 1)
            if length >= MIN_REUSED_TOKENS and (best is None or length > best.length):
                best = PrefixMatch(entry, length)
        if best is not None:
            best.entry.last_used = time.monotonic()
        return best

    def add(self, entry: CachedPrefix) -> list[str]:
        """Keep `entry`; the sessions no longer kept (to close on every stage): entries it
        contains whole, entries of older epochs, and the least recently used beyond
        `max_entries`."""
        doomed = [
            old.session_id
            for old in self._entries.values()
            if old.epoch != entry.epoch
            or (
                len(old.tokens) <= len(entry.tokens)
                and entry.tokens[: len(old.tokens)] == old.tokens
            )
        ]
        for session_id in doomed:
            del self._entries[session_id]
        self._entries[entry.session_id] = entry
        while len(self._entries) > self.max_entries:
            oldest = min(self._entries.values(), key=lambda e: e.last_used)
            del self._entries[oldest.session_id]
            doomed.append(oldest.session_id)
        return doomed

    def remove(self, session_id: str) -> bool:
        return self._entries.pop(session_id, None) is not None

    def session_ids(self) -> list[str]:
        return list(self._entries)
