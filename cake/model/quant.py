"""Quantized weights: int8 per output channel, int4 in groups (the data; the modules that run
them are in cake/model/linear.py, their kernels in cake/model/kernels/).

A `QuantizedTensor` is the device-independent form of one (out, in) weight, the form GGUF
blocks decode into, split bundles store and the kernels read or pack for their device:

- int8:  q int8 (out, in), scales (out,);                 w[o, i] = q[o, i] * scale[o]
- int4:  q uint8 (out, in/2), two values per byte (column 2j in the low nibble, 2j+1 in the
         high one), scales and zeros (out, in/group);       w[o, i] = (q[o, i] - 8) * scale[o, g]
         + zero[o, g] with g = i // group.                  (the convention of torch's int4
                                                             kernels, so nothing is re-derived)

Scales and zeros are bf16: torch's CPU and CUDA kernels take them in the activations' dtype
(and are fast only with bf16 activations), and cake's own kernels read them as stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

SCHEMES = ("int8", "int4")


DEFAULT_GROUP_SIZE = 32


KERNEL_DTYPE = torch.bfloat16


# Rows quantized or packed at a time: bounds the f32/int32 temporaries of one big matrix to a
# few MB instead of 4 bytes per weight (a multiple of 64, the CPU int4 packing's row block).
CHUNK_ROWS = 512


@dataclass
class QuantizedTensor:
    """One (out, in) weight in cake's quantized form (see the module docstring)."""

    scheme: str  # "int8" or "int4"
    q: torch.Tensor  # int8 (out, in) | uint8 (out, in // 2)
    scales: torch.Tensor  # bf16 (out,) | bf16 (out, in // group_size)
    zeros: torch.Tensor | None = None  # int4 only: bf16 (out, in // group_size)
    group_size: int = 0  # int4 only

    @property
    def shape(self) -> tuple[int, int]:
        out, cols = self.q.shape
        return (out, cols * 2) if self.scheme == "int4" else (out, cols)

    @property
    def nbytes(self) -> int:
        parts = [self.q, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def describe(self) -> str:
        return "int8" if self.scheme == "int8" else f"int4/g{self.group_size}"

    def rows(self, ids: torch.Tensor | slice) -> QuantizedTensor:
        """The same weight restricted (or permuted) to output rows `ids`."""
        zeros = self.zeros[ids] if self.zeros is not None else None
        return QuantizedTensor(self.scheme, self.q[ids], self.scales[ids], zeros, self.group_size)

    def unpacked(self) -> torch.Tensor:
        """int4: the 4-bit values as uint8 (out, in), 0..15; int8: q itself."""
        if self.scheme == "int8":
            return self.q
        low, high = self.q & 0x0F, self.q >> 4
        return torch.stack([low, high], dim=-1).reshape(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight it stands for, (out, in) in `dtype`, computed in f32 CHUNK_ROWS rows at a
        time (a whole f32 copy of a 128k-row embedding would be 2 GB of temporaries)."""
        out, cols = self.shape
        if out <= CHUNK_ROWS:
            return self._dequantize_rows(dtype)
        result = torch.empty(out, cols, dtype=dtype)
        for start in range(0, out, CHUNK_ROWS):
            chunk = self.rows(slice(start, start + CHUNK_ROWS))
            result[start : start + CHUNK_ROWS] = chunk._dequantize_rows(dtype)
        return result

    def to_int8(self) -> QuantizedTensor:
        """The same weight requantized to int8 per channel, chunk by chunk."""
        if self.scheme == "int8":
            return self
        out, cols = self.shape
        result = QuantizedTensor.empty("int8", out, cols)
        for start in range(0, out, CHUNK_ROWS):
            rows = self.rows(slice(start, start + CHUNK_ROWS))
            result.fill(start, quantize(rows._dequantize_rows(torch.float32), "int8"))
        return result

    def _dequantize_rows(self, dtype: torch.dtype) -> torch.Tensor:
        if self.scheme == "int8":
            return (self.q.float() * self.scales.float()[:, None]).to(dtype)
        out, cols = self.shape
        groups = cols // self.group_size
        assert self.zeros is not None
        q = self.unpacked().float().reshape(out, groups, self.group_size)
        w = (q - 8) * self.scales.float()[..., None] + self.zeros.float()[..., None]
        return w.reshape(out, cols).to(dtype)

    @staticmethod
    def empty(scheme: str, out: int, cols: int, group_size: int = 0) -> QuantizedTensor:
        """Uninitialised storage, filled row chunk by row chunk (`fill`): allocating the result
        once, before the chunks' temporaries, keeps those from fragmenting the heap (building
        a weight from many small kept pieces held ~10x its size at the peak)."""
        if scheme == "int8":
            return QuantizedTensor(
                "int8",
                torch.empty(out, cols, dtype=torch.int8),
                torch.empty(out, dtype=KERNEL_DTYPE),
            )
        groups = cols // group_size
        return QuantizedTensor(
            "int4",
            torch.empty(out, cols // 2, dtype=torch.uint8),
            torch.empty(out, groups, dtype=KERNEL_DTYPE),
            torch.empty(out, groups, dtype=KERNEL_DTYPE),
            group_size,
        )

    def fill(self, start: int, part: QuantizedTensor) -> None:
        """Write `part` into rows start.. of this weight."""
        end = start + part.q.shape[0]
        self.q[start:end] = part.q
        self.scales[start:end] = part.scales
        if self.zeros is not None and part.zeros is not None:
            self.zeros[start:end] = part.zeros

    @staticmethod
    def cat(parts: Sequence[QuantizedTensor]) -> QuantizedTensor:
        """Stack weights along the output dimension (fused q|k|v, gate|up)."""
        first = parts[0]
        if len(parts) == 1:
            return first
        if any((p.scheme, p.group_size) != (first.scheme, first.group_size) for p in parts):
            raise ValueError("cannot fuse weights quantized differently")
        zeros = torch.cat([p.zeros for p in parts]) if first.zeros is not None else None
        return QuantizedTensor(
            first.scheme,
            torch.cat([p.q for p in parts]),
            torch.cat([p.scales for p in parts]),
            zeros,
            first.group_size,
        )


Weight = torch.Tensor | QuantizedTensor  # a checkpoint weight, float or already quantized


def quantize(
    weight: torch.Tensor, scheme: str, group_size: int = DEFAULT_GROUP_SIZE
) -> QuantizedTensor:
    """Quantize a float (out, in) weight, CHUNK_ROWS rows at a time (small temporaries)."""
    if scheme not in SCHEMES:
        raise ValueError(f"--quantize {scheme!r}: use {' or '.join(SCHEMES)}")
    out, cols = weight.shape
    if scheme == "int4" and cols % group_size:
        raise ValueError(
            f"int4 needs the input size ({cols}) to be a multiple of the group size "
            f"({group_size}); use --quantize int8 for this model"
        )
    result = QuantizedTensor.empty(scheme, out, cols, group_size)
    for start in range(0, out, CHUNK_ROWS):
        result.fill(start, _quantize_rows(weight[start : start + CHUNK_ROWS], scheme, group_size))
    return result


def _quantize_rows(weight: torch.Tensor, scheme: str, group_size: int) -> QuantizedTensor:
    w = weight.detach().to("cpu", torch.float32)
    if scheme == "int8":
        # Symmetric per output channel; q is computed from the bf16-rounded scale, so that
        # q * scale is exactly what the kernel multiplies by.
        scales = (w.abs().amax(dim=1) / 127).to(KERNEL_DTYPE)
        safe = torch.where(scales == 0, 1.0, scales.float())
        q = torch.round(w / safe[:, None]).clamp(-127, 127).to(torch.int8)
        return QuantizedTensor("int8", q, scales)
    rows, cols = w.shape
    groups = w.reshape(rows, cols // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).to(KERNEL_DTYPE)
    zeros = (low + 8 * scales.float()).to(KERNEL_DTYPE)
    safe = torch.where(scales == 0, 1.0, scales.float())
    q = torch.round((groups - zeros.float()[..., None]) / safe[..., None] + 8).clamp(0, 15)
    return QuantizedTensor(
        "int4", pack_nibbles(q.to(torch.uint8).reshape(rows, cols)), scales, zeros, group_size
    )


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """uint8 (out, in) holding 0..15 -> uint8 (out, in/2): column 2j low nibble, 2j+1 high."""
    return values[:, 0::2] | (values[:, 1::2] << 4)


@dataclass(frozen=True)
class Quantization:
    """--quantize: what float linear weights become (weights stored quantized stay as they are).

    The head becomes int8 whatever the scheme: it is the most quality-sensitive matrix, and
    when tied it doubles as the embedding table, whose rows only int8 can hand out cheaply.
    """

    scheme: str  # "int8" | "int4"
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"--quantize {self.scheme!r}: use {' or '.join(SCHEMES)}")
        if self.group_size <= 0 or self.group_size % 32:
            raise ValueError(f"int4 group size {self.group_size}: use a multiple of 32")
