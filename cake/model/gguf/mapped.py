"""GGUF Q4_0, Q4_1 and Q8_0 weights used where they lie: views of the file's mapped pages.

cake's own CPU kernels read these block formats as stored (cpu_avx2.cpp, `cake_gguf_linear`),
so such a weight is never read into memory, converted or packed: its module holds a view of the
file mapping, the first forward pages the bytes in, and every process that maps the same file
on one machine shares one copy of them in the page cache (a master and its workers on one host
hold the weights once; a restarted worker finds them still cached). Other formats are converted
as blocks.py says (and kept in the packed-weight cache).

Float tensors (F32, F16, BF16) are views of the mapping too (`mapped_floats`): used in place
where the run keeps them as stored. The file is mapped once per process and stays mapped while
any view of it lives.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cake.errors import ModelFolderError
from cake.model.gguf.blocks import decode
from cake.model.quant import QuantizedTensor

BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # bytes per block of 32 values
SCHEMES = {"Q4_0": "int4", "Q4_1": "int4", "Q8_0": "int8"}  # cake's form of each, converted
MADV_WILLNEED, MADV_POPULATE_READ = 3, 22  # Linux; POPULATE_READ since 5.14
PAGE = mmap.PAGESIZE


OFF_VARIABLE = "CAKE_NO_MMAP"  # set (to anything but 0): off, as --no-mmap
_enabled: bool | None = None  # None: as OFF_VARIABLE says


def configure(enabled: bool | None) -> None:
    """--no-mmap, for every load in this process (None: as CAKE_NO_MMAP says)."""
    global _enabled
    _enabled = enabled


def enabled() -> bool:
    """Whether loads map the blocks cake's kernels read as stored (else they convert them)."""
    if _enabled is not None:
        return _enabled
    return os.environ.get(OFF_VARIABLE, "").strip() in ("", "0")


@dataclass(frozen=True)
class MappedBlocks:
    """One (out, in) Q4_0/Q4_1/Q8_0 weight in the mapped file: `data` holds its `out` rows of
    in / 32 blocks each, as stored.

    order: the stored rows are in another order than the model's (llama.cpp keeps q and k rows
    in its RoPE order): output i of the weight is stored row order[i], so a product computed on
    the stored rows is gathered back (y[:, order]); rows are never moved.
    """

    kind: str  # "Q4_0", "Q4_1" or "Q8_0"
    data: torch.Tensor  # uint8 (out, in // 32 * BLOCK_BYTES[kind]), a view of the mapping
    shape: tuple[int, int]
    order: torch.Tensor | None = None  # int64 (out,)

    @property
    def block_bytes(self) -> int:
        return BLOCK_BYTES[self.kind]

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def rows(self, ids: torch.Tensor) -> MappedBlocks:
        """The same weight with its outputs permuted: output i is output ids[i] of this one."""
        order = ids if self.order is None else self.order[ids]
        return replace(self, order=order.to(torch.int64), shape=(len(ids), self.shape[1]))

    def to_quantized(self) -> QuantizedTensor:
        """cake's int4 (int8 for Q8_0) form of it (where the stored blocks are not what runs:
        another kernel, another device), converted as blocks.py converts any such tensor."""
        converted = decode(self.data.numpy().reshape(-1), self.kind, self.shape)
        assert isinstance(converted, QuantizedTensor)
        return converted if self.order is None else converted.rows(self.order)


def can_map(kind: str, shape: tuple[int, ...]) -> bool:
    """Whether a GGUF tensor of this type and shape can be used as MappedBlocks."""
    return kind in BLOCK_BYTES and len(shape) == 2 and shape[1] % 32 == 0


def mapped_blocks(
    path: Path, kind: str, shape: tuple[int, int], offset: int, nbytes: int
) -> MappedBlocks:
    """The tensor whose bytes lie at [offset, offset + nbytes) of the GGUF file at `path`."""
    out, cols = shape
    if nbytes != out * cols // 32 * BLOCK_BYTES[kind]:
        raise ModelFolderError(f"{path}: a {kind} tensor of shape {shape} cannot be {nbytes} bytes")
    return MappedBlocks(kind, _view(path, offset, nbytes).view(out, -1), (out, cols))


FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def mapped_floats(
    path: Path, kind: str, shape: tuple[int, ...], offset: int, nbytes: int
) -> torch.Tensor:
    """A float tensor of the GGUF file as a view of its mapping (a run in another dtype, or a
    layout that fuses or transposes it, copies it then; one used as it is stays in place)."""
    return _view(path, offset, nbytes).view(FLOAT_DTYPES[kind]).reshape(shape)


def _view(path: Path, offset: int, nbytes: int) -> torch.Tensor:
    whole = _file_bytes(str(path.resolve()), os.stat(path).st_mtime_ns)
    if offset + nbytes > whole.numel():
        raise ModelFolderError(
            f"{path} is truncated: a tensor ends at byte {offset + nbytes}, the file has "
            f"{whole.numel()}; download it again"
        )
    return whole[offset : offset + nbytes]


@functools.lru_cache(maxsize=8)
def _file_bytes(path: str, mtime_ns: int) -> torch.Tensor:
    """The whole file as a uint8 tensor over a private mapping (once per file and process;
    `mtime_ns` makes a rewritten file a new mapping). Copy-on-write: nothing writes weights,
    and were something to, it would get its own page, never the file's nor a crash."""
    try:
        with open(path, "rb") as file:
            mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as error:  # a filesystem that cannot map files
        raise ModelFolderError(
            f"{path} cannot be memory-mapped ({error}); run with --no-mmap (or CAKE_NO_MMAP=1) "
            "to read and convert its weights instead"
        ) from None
    return torch.frombuffer(mapping, dtype=torch.uint8)


def page_in(weights: Iterable[MappedBlocks]) -> threading.Thread | None:
    """Map the weights' pages into this process on a thread, while the rest of the start goes
    on (the tokenizer, the workers' handshakes): the first forward would otherwise fault them in
    a page at a time (~0.7 s for the Llama-3-8B shape's 4.2 GiB), and a file not in the page
    cache is read from disk here, ahead of it. The thread is started and returned; None when
    there is nothing to page in or the system has no madvise."""
    merged = page_spans(weights)
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # not a POSIX libc
        return None
    if not merged:
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    thread = threading.Thread(
        target=_page_in, args=(madvise, merged), name="cake-page-in", daemon=True
    )
    thread.start()
    return thread


def page_spans(weights: Iterable[MappedBlocks]) -> list[tuple[int, int]]:
    """The address ranges the weights' bytes lie in, from page starts, overlaps merged."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted((w.data.data_ptr() // PAGE * PAGE, w.data.data_ptr() + w.nbytes)
                             for w in weights):  # fmt: skip
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _page_in(madvise: ctypes._CFuncPtr, spans: list[tuple[int, int]]) -> None:
    # ctypes releases the GIL for the call: the start goes on meanwhile.
    for start, end in spans:
        if madvise(start, end - start, MADV_POPULATE_READ) != 0:  # an older kernel: read ahead
            madvise(start, end - start, MADV_WILLNEED)
