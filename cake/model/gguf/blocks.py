"""GGUF quantized blocks -> cake's weight forms, one tensor's bytes at a time.

What each GGUF tensor type becomes (cake.model.quant's forms; exact means bit-exact up to the bf16
rounding of scales and zeros):
- Q4_0, Q4_1, Q4_K: int4 in groups of 32, exactly (w = (q - 8) * s + z with s = d, z = 0 for
  Q4_0; s = d, z = m + 8d for Q4_1; s = d * sc, z = 8 * d * sc - dmin * m for Q4_K's sub-blocks).
- Q8_0, Q5_0, Q5_1, Q5_K, Q6_K (and other types gguf can decode): int8 per output channel,
  requantized from their decoded values (one tensor at a time; int8's per-row step is finer than
  these formats' own, see README). Torch has no kernel for int8 in groups.
- F32, F16, BF16: float tensors, handled like any checkpoint's (the run dtype, or --quantize).
"""

from __future__ import annotations

import numpy as np
import torch

from cake.errors import ModelFolderError
from cake.model.quant import CHUNK_ROWS, KERNEL_DTYPE, QuantizedTensor, pack_nibbles, quantize

FLOAT_TYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")


def decode(raw: np.ndarray, kind: str, shape: tuple[int, ...]) -> torch.Tensor | QuantizedTensor:
    """One GGUF tensor's bytes -> a float tensor (float types) or a QuantizedTensor."""
    if kind in FLOAT_TYPES:
        values = torch.from_numpy(raw.view(FLOAT_TYPES[kind]).copy()).reshape(shape)
        return values.view(torch.bfloat16) if kind == "BF16" else values
    if len(shape) != 2:
        raise ModelFolderError(f"a {kind} tensor of shape {shape}: cake expects 2-D weights")
    out, cols = shape
    # Row chunks keep the decoding temporaries (f32 values are 8x a Q4 tensor's bytes) small.
    row_bytes = raw.size // out
    int4 = kind in INT4_TYPES
    result = QuantizedTensor.empty("int4" if int4 else "int8", out, cols, 32)
    for start in range(0, out, CHUNK_ROWS):
        rows = min(CHUNK_ROWS, out - start)
        chunk = raw[start * row_bytes : (start + rows) * row_bytes]
        if int4:
            result.fill(start, decode_int4(chunk, kind, rows, cols))
        else:
            values = torch.from_numpy(dequantize_rows(chunk, kind, rows, cols))
            result.fill(start, quantize(values, "int8"))
    return result


def dequantize_rows(raw: np.ndarray, kind: str, out: int, cols: int) -> np.ndarray:
    """f32 (out, cols) values of a quantized tensor: Q8_0 here, other types by gguf's decoder."""
    if kind == "Q8_0":
        blocks = raw.reshape(-1, 34)
        scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (n, 1)
        values = blocks[:, 2:].copy().view(np.int8).astype(np.float32)  # (n, 32)
        return (values * scale).reshape(out, cols)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        qtype = GGMLQuantizationType[kind]
        return dequantize(raw.reshape(out, -1), qtype).reshape(out, cols).astype(np.float32)
    except (KeyError, NotImplementedError) as exc:
        raise ModelFolderError(f"GGUF tensor type {kind} is not supported ({exc})") from None


def decode_int4(raw: np.ndarray, kind: str, out: int, cols: int) -> QuantizedTensor:
    """Q4_0 / Q4_1 / Q4_K bytes -> int4 groups of 32, without going through floats."""
    groups = out * cols // 32
    if kind == "Q4_0":  # 18 bytes per 32 values: d (f16), 16 bytes of nibbles
        blocks = raw.reshape(groups, 18)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
        zero = np.zeros_like(d)
        nibbles = blocks[:, 2:]
    elif kind == "Q4_1":  # 20 bytes: d, m (f16), 16 bytes of nibbles; w = d * q + m
        blocks = raw.reshape(groups, 20)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
        zero = m + 8 * d
        nibbles = blocks[:, 4:]
    else:  # Q4_K: 144 bytes per 256 values, 8 sub-blocks of 32 with 6-bit scales and mins
        supers = raw.reshape(groups // 8, 144)
        d = supers[:, :2].copy().view(np.float16).astype(np.float32)  # (n, 1)
        dmin = supers[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mn = _q4k_scales_mins(supers[:, 4:16])  # (n, 8) each
        d_sub = (d * sc).reshape(-1)  # (groups,)
        zero = 8 * d_sub - (dmin * mn).reshape(-1)
        d = d_sub
        # qs: 4 chunks of 32 bytes; a chunk's low nibbles are sub-block 2c, its high ones 2c+1.
        qs = supers[:, 16:].reshape(-1, 4, 32)
        values = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(groups, 32)
        return _int4(values, d, zero, out, cols)
    # Q4_0/Q4_1: byte j holds value j (low nibble) and value j + 16 (high nibble); cake's byte
    # j holds values 2j and 2j + 1. Moved byte-wise, never unpacked to one value per byte
    # (that took 12 of the 30 s a Qwen3-30B-A3B block of 128 experts took to read).
    even, odd = nibbles[:, 0::2], nibbles[:, 1::2]  # values 2k, 2k + 1 (low) and +16 (high)
    packed = np.concatenate([(even & 0x0F) | (odd << 4), (even >> 4) | (odd & 0xF0)], axis=1)
    q = torch.from_numpy(np.ascontiguousarray(packed)).reshape(out, cols // 2)
    return _int4_from_packed(q, d, zero, out, cols)


def _q4k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes of 6-bit scales and mins for 8 sub-blocks -> two (n, 8) float arrays."""
    b = packed.reshape(-1, 3, 4)
    d, m, m_d = b[:, 0], b[:, 1], b[:, 2]
    scales = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _int4(
    values: np.ndarray, scale: np.ndarray, zero: np.ndarray, out: int, cols: int
) -> QuantizedTensor:
    q = pack_nibbles(torch.from_numpy(np.ascontiguousarray(values)).reshape(out, cols))
    return _int4_from_packed(q, scale, zero, out, cols)


def _int4_from_packed(
    q: torch.Tensor, scale: np.ndarray, zero: np.ndarray, out: int, cols: int
) -> QuantizedTensor:
    scales = torch.from_numpy(scale).reshape(out, cols // 32).to(KERNEL_DTYPE)
    zeros = torch.from_numpy(zero).reshape(out, cols // 32).to(KERNEL_DTYPE)
    return QuantizedTensor("int4", q, scales, zeros, 32)
