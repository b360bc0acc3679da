"""A GGUF file's header, walked by our own few lines: its metadata values and tensor infos.

We walk the header ourselves rather than with gguf.GGUFReader: the reader builds numpy objects
for every metadata value, and for a 49k-token vocabulary that parse alone peaked at 160 MB (more
for Llama 3's 128k). This walk keeps the values cake reads (numbers, strings, small arrays) and
skips the tokenizer's arrays (`tokenizer.ggml.*`: tokens, merges, scores), which only the
tokenizer conversion reads, once (folder.py).
"""

from __future__ import annotations

import functools
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import numpy as np
import torch

from cake.errors import ModelFolderError
from cake.model.gguf.blocks import FLOAT_TYPES


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: its GGUF type ("Q4_0", "F32"), its shape in torch order (the
    slowest-moving dimension first, the reverse of GGUF's), and where its bytes lie."""

    name: str
    kind: str
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    metadata: dict[str, Any]  # key -> value, but the tokenizer's arrays
    tensors: dict[str, TensorInfo]  # by GGUF name, in file order

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_value(self, key: str, default: Any = None) -> Any:
        """`{architecture}.{key}` (llama.cpp's per-architecture keys), or `default`."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def read_floats(self, name: str) -> torch.Tensor:
        """A small float tensor (rope factors) as float32."""
        info = self.tensors[name]
        if info.kind not in FLOAT_TYPES:
            raise ModelFolderError(f"{self.path}: tensor {name!r} is {info.kind}, not a float type")
        with open(self.path, "rb") as file:
            file.seek(info.offset)
            raw = np.frombuffer(file.read(info.nbytes), dtype=FLOAT_TYPES[info.kind])
        values = torch.from_numpy(raw.copy())
        return (values.view(torch.bfloat16) if info.kind == "BF16" else values).float()


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """The header of a GGUF file, parsed once per file version and process."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _read(str(resolved), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read(path: str, size: int, mtime_ns: int) -> GGUFHeader:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        with open(path, "rb") as file:
            walk = _Walk(file)
        tensors = {}
        for name, dims, type_id, offset in walk.tensors:
            kind = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[kind]
            nbytes = math.prod(dims) // block * type_size
            start = walk.data_start + offset
            if start + nbytes > size:
                raise ValueError(f"tensor {name} lies past the end of the file")
            shape = tuple(reversed(dims))  # GGUF lists the fastest-moving dimension first
            tensors[name] = TensorInfo(name, kind.name, shape, start, nbytes)
    except (ValueError, KeyError, struct.error, UnicodeDecodeError, OSError) as exc:
        raise ModelFolderError(f"{path}: not a readable GGUF file ({exc})") from exc
    return GGUFHeader(Path(path), walk.metadata, tensors)


SKIP_CHUNK = 1 << 20  # bytes read at a time while skipping an array of strings


class _Walk:
    """GGUF v2/v3: the magic, the version, the metadata key/values, the tensor infos."""

    # Fixed-size metadata value types -> struct format (the spec's type ids).
    _SCALARS: ClassVar[dict[int, str]] = dict(enumerate("BbHhIif?")) | {10: "Q", 11: "q", 12: "d"}
    _STRING, _ARRAY = 8, 9
    _SKIPPED = "tokenizer.ggml."  # arrays under this prefix are skipped, not read

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        if file.read(4) != b"GGUF":
            raise ValueError("no GGUF magic")
        (version,) = self._unpack("<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old (need 2 or later)")
        n_tensors, n_kv = self._unpack("<QQ")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (value_type,) = self._unpack("<I")
            if value_type == self._ARRAY and key.startswith(self._SKIPPED):
                self._skip(value_type)
            else:
                self.metadata[key] = self._value(value_type)
        self.tensors = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            type_id, offset = self._unpack("<IQ")
            self.tensors.append((name, dims, type_id, offset))
        alignment = self.metadata.get("general.alignment", 32)
        position = file.tell()
        self.data_start = position + (-position % alignment)

    def _unpack(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        data = self.file.read(size)
        if len(data) != size:
            raise ValueError("the header ends early")
        return struct.unpack(fmt, data)

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        return self.file.read(length).decode("utf-8")

    def _value(self, value_type: int) -> Any:
        if value_type in self._SCALARS:
            return self._unpack("<" + self._SCALARS[value_type])[0]
        if value_type == self._STRING:
            return self._string()
        if value_type == self._ARRAY:
            item_type, count = self._unpack("<IQ")
            if item_type in self._SCALARS:
                return list(self._unpack(f"<{count}{self._SCALARS[item_type]}"))
            return [self._value(item_type) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {value_type}")

    def _skip(self, value_type: int) -> None:
        if value_type in self._SCALARS:
            self.file.seek(struct.calcsize(self._SCALARS[value_type]), 1)
        elif value_type == self._STRING:
            (length,) = self._unpack("<Q")
            self.file.seek(length, 1)
        elif value_type == self._ARRAY:
            item_type, count = self._unpack("<IQ")
            if item_type in self._SCALARS:
                self.file.seek(count * struct.calcsize(self._SCALARS[item_type]), 1)
            elif item_type == self._STRING:
                self._skip_strings(count)
            else:
                for _ in range(count):
                    self._skip(item_type)
        else:
            raise ValueError(f"unknown metadata value type {value_type}")

    def _skip_strings(self, count: int) -> None:
        """Past `count` strings (a vocabulary, its merges) by their lengths, read from chunks
        of the file: a read and a seek per string took 0.6 s for Llama 3's 400k of them."""
        chunk, at = b"", 0
        for _ in range(count):
            if at + 8 > len(chunk):
                self.file.seek(at - len(chunk), 1)  # to the unread bytes, or past a string
                chunk, at = self.file.read(SKIP_CHUNK), 0
                if len(chunk) < 8:
                    raise ValueError("the header ends early")
            (length,) = struct.unpack_from("<Q", chunk, at)
            at += 8 + length
        self.file.seek(at - len(chunk), 1)
