"""The KV cache of one block of one session, grown in pages; a session's caches by block; and
the segment of a batched step that one session's rows are."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def paged_capacity(end: int, page: int, max_seq_len: int) -> int:
    """Positions a cache holding 0..end-1 allocates: whole pages, never beyond the context."""
    return min(-(-end // page) * page, max(max_seq_len, end))


class KVCache:
    """Keys and values of one block of one session, grown as positions are written.

    Storage is one contiguous (1, n_kv, capacity, hd) tensor per k and v, so attention reads a
    plain slice (decode stays as fast as with a preallocated cache). Capacity grows in pages of
    `page` positions with `torch.empty`: positions that are never written are never filled or
    read, and growing copies only the positions written so far. The session store decides how
    many positions a session may hold (`SessionStore.reserve`); this class only allocates.
    """

    def __init__(
        self,
        n_kv_heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        page: int,
        max_seq_len: int,
    ) -> None:
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.device, self.dtype = device, dtype
        self.page, self.max_seq_len = page, max_seq_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor storage this cache holds right now."""
        if self.k is None or self.v is None:
            return 0
        return self.k.untyped_storage().nbytes() + self.v.untyped_storage().nbytes()

    def _grow(self, end: int, keep: int) -> None:
        """Room for positions 0..end-1, keeping positions 0..keep-1 (the rest is unwritten)."""
        capacity = paged_capacity(end, self.page, self.max_seq_len)
        shape = (1, self.n_kv_heads, capacity, self.head_dim)
        k = torch.empty(shape, device=self.device, dtype=self.dtype)
        v = torch.empty(shape, device=self.device, dtype=self.dtype)
        if self.k is not None and self.v is not None and keep:
            k[:, :, :keep] = self.k[:, :, :keep]
            v[:, :, :keep] = self.v[:, :, :keep]
        self.k, self.v = k, v

    def copy_prefix(self, source: KVCache, length: int) -> None:
        """Hold a copy of `source`'s positions 0..length-1 (a session forked from a cached
        prefix): one copy of what is kept, never shared, so neither cache sees the other's
        later writes."""
        if source.k is None or source.v is None or source.capacity < length:
            raise ValueError(f"the source cache holds fewer than {length} positions")
        self._grow(length, keep=0)
        assert self.k is not None and self.v is not None
        self.k[:, :, :length] = source.k[:, :, :length]
        self.v[:, :, :length] = source.v[:, :, :length]

    def update(
        self, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (1, n_kv, T, hd) at start_pos; return every key/value up to the last one.

        Positions 0..start_pos-1 must have been written before. Whatever was stored at
        start_pos or beyond (a rolled-back draft) is overwritten or, past the returned end,
        never read: the returned views stop at start_pos + T.
        """
        end = start_pos + k.shape[2]
        if end > self.capacity:
            self._grow(end, keep=start_pos)
        assert self.k is not None and self.v is not None
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


SessionCache = dict[int, KVCache]  # block index -> its KV cache


@dataclass(frozen=True)
class Segment:
    """One session's rows in a batched step: rows offset..offset+length-1 of the batch, at
    positions start_pos..start_pos+length-1 of that session, attending to its own caches."""

    cache: SessionCache
    start_pos: int
    offset: int
    length: int
