"""The GGUF header, walked by our own few lines: tensor infos kept, metadata values skipped."""

from __future__ import annotations

import struct
from typing import BinaryIO, ClassVar


class Header:
    """GGUF v2/v3 header walk: metadata skipped (but for the alignment), tensor infos kept."""

    # Fixed-size metadata value types -> struct format (the spec's type ids).
    _SCALARS: ClassVar[dict[int, str]] = dict(enumerate("BbHhIif?")) | {10: "Q", 11: "q", 12: "d"}
    _STRING, _ARRAY = 8, 9

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        if file.read(4) != b"GGUF":
            raise ValueError("no GGUF magic")
        (version,) = self._unpack("<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old (need 2 or later)")
        n_tensors, n_kv = self._unpack("<QQ")
        alignment = 32
        for _ in range(n_kv):
            key = self._string()
            (value_type,) = self._unpack("<I")
            if key == "general.alignment" and value_type == 4:
                (alignment,) = self._unpack("<I")
            else:
                self._skip(value_type)
        self.tensors = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            type_id, offset = self._unpack("<IQ")
            self.tensors.append((name, dims, type_id, offset))
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
            else:
                for _ in range(count):
                    self._skip(item_type)
        else:
            raise ValueError(f"unknown metadata value type {value_type}")
