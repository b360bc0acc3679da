"""One cache entry: a safetensors file of packed tensors, its metadata, and a CRC-32 of the
tensors' bytes.

Written to a temporary name in the same folder and renamed over the entry, so a reader sees the
old entry or the new one, never half of one (two processes writing the same entry: the last
rename wins, both whole). Read through safetensors' memory map: the tensors are views of the
file's pages (no copy; the page cache is shared by every process that maps it). Before any
tensor is used, every byte is checked against the CRC (zlib's, ~2 GB/s here: 0.3 s for a 1B
model's 0.7 GB, which are paged in for the first step anyway), so a truncated file or a flipped
bit is refused (`CorruptEntry`) and rebuilt, never run.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

CHECKSUM_KEY = "crc32"


class CorruptEntry(Exception):
    """An entry that cannot be trusted: unreadable, truncated, or not its checksum."""


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """CRC-32 over the tensors' bytes in name order."""
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(_bytes_of(tensors[name]), crc)
    return f"{crc:08x}"


def _bytes_of(tensor: torch.Tensor) -> np.ndarray | bytes:
    """The tensor's bytes as a buffer zlib reads in place (a uint8 view, no copy)."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy()


# torch dtype -> safetensors' name for it (the dtypes packed weights come in).
DTYPES = {
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
}


def write_entry(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Write the entry atomically; its size in bytes. OSError (a full disk, a read-only cache)
    leaves no partial file behind.

    The safetensors layout is written here, tensor by tensor from their own memory (the
    library's `save` builds the whole file in memory first: a second copy of the weights and
    ~30% of the write's time). Larger items first, so every tensor's offset is a multiple of
    its item size and the mapped views are aligned."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    order = sorted(cpu, key=lambda name: (-cpu[name].element_size(), name))
    header: dict = {"__metadata__": {**metadata, CHECKSUM_KEY: checksum(cpu)}}
    offset = 0
    for name in order:
        tensor = cpu[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as file:
            file.write(struct.pack("<Q", len(encoded)) + encoded)
            for name in order:
                file.write(_bytes_of(cpu[name]))
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise
    return 8 + len(encoded) + offset


def read_entry(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The entry's tensors (mapped) and metadata; FileNotFoundError when there is none,
    CorruptEntry when it cannot be trusted."""
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        with safe_open(path, framework="pt") as file:
            metadata = dict(file.metadata() or {})
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own error types for a bad header
        raise CorruptEntry(f"unreadable ({error})") from None
    stored = metadata.pop(CHECKSUM_KEY, None)
    if stored is None or checksum(tensors) != stored:
        raise CorruptEntry("its bytes do not match its checksum")
    return tensors, metadata
