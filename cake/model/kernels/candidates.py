"""The candidate kernels for each quantized weight format, one class each.

A kernel reads one *layout* (the bytes it keeps for a weight); kernels of the same layout share
one packed copy, so a projection can decode with one and prefill with another at no memory
cost. The layouts: `cake-int4` and `cake-int8` are cake's QuantizedTensor forms as they are
(see cake/model/quant.py), `torch-int4pack-*` torch's own int4 tiling, `fbgemm` fbgemm's packed
int8, `dense-bf16` the dequantized weight (twice to four times the bytes: used only when the
user names that kernel).

- torch (int4, int8; CPU, CUDA): torch's `_weight_int4pack_mm[_for_cpu]` and
  `_weight_int8pack_mm`, bf16 activations.
- avx2 (int4, int8; x86 CPUs with AVX2): cake's cpu_avx2.cpp, activations quantized to int8
  per 32 values, integer dot products.
- dequant-gemm (int4, int8; x86 with AVX2): a tile of rows dequantized to f32, then the BLAS
  GEMM (a prefill kernel).
- fbgemm (int8; x86): fbgemm's dynamic int8 linear (activations to uint8 per tensor).
- dense (int4, int8; any device): the weight dequantized to bf16 once, `F.linear` (trades
  memory for speed: used only when named).

`run(packed, x)` takes a 2-D input in any float dtype and returns (rows, out) in f32 or bf16;
QuantizedLinear casts to the stage's dtype.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from cake.model.kernels import native
from cake.model.quant import KERNEL_DTYPE, QuantizedTensor

Packed = dict[str, Any]

# Bytes of f32 weight rows one dequant-gemm tile holds (the tile is reused, not kept).
TILE_BYTES = 4 << 20


class Kernel:
    name: ClassVar[str]
    scheme: ClassVar[str]  # "int4" or "int8"
    device_type: ClassVar[str] = "cpu"
    layout: ClassVar[str]
    trades_memory: ClassVar[bool] = False  # chosen only when named with --kernels
    serves_rows: ClassVar[bool] = True  # its layout hands out rows (a tied embedding table)

    def unusable(self, shape: tuple[int, int], group_size: int) -> str | None:
        """Why this kernel cannot run a weight of this shape here; None if it can."""
        return None

    def pack(self, weight: QuantizedTensor, device: torch.device) -> Packed:
        raise NotImplementedError

    def run(self, packed: Packed, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{self.name}({self.scheme}, {self.device_type})"


def _cake_int4(weight: QuantizedTensor, device: torch.device) -> Packed:
    """The weight as stored; zeros dropped when all are zero (Q4_0: a tenth of the bytes a
    decode step reads)."""
    assert weight.zeros is not None
    packed: Packed = {
        "q": weight.q.to(device).contiguous(),
        "scales": weight.scales.to(device, KERNEL_DTYPE).contiguous(),
        "group_size": weight.group_size,
    }
    if bool(weight.zeros.any()):
        packed["zeros"] = weight.zeros.to(device, KERNEL_DTYPE).contiguous()
    return packed


def _zeros_pointer(packed: Packed) -> int | None:
    zeros = packed.get("zeros")
    return None if zeros is None else zeros.data_ptr()


def _cake_int8(weight: QuantizedTensor, device: torch.device) -> Packed:
    return {
        "q": weight.q.to(device).contiguous(),
        "scales": weight.scales.to(device, KERNEL_DTYPE).contiguous(),
    }


def _needs_native(shape: tuple[int, int]) -> str | None:
    reason = native.unavailable_reason()
    if reason is not None:
        return reason
    return f"the input size ({shape[1]}) is not a multiple of 32" if shape[1] % 32 else None


class CakeKernel(Kernel):
    """cake's own kernels (cpu_avx2.cpp), on cake's layouts: the QuantizedTensor as stored."""

    def unusable(self, shape: tuple[int, int], group_size: int) -> str | None:
        return _needs_native(shape)

    def pack(self, weight: QuantizedTensor, device: torch.device) -> Packed:
        return _cake_int4(weight, device) if self.scheme == "int4" else _cake_int8(weight, device)


# --- int4 ------------------------------------------------------------------------------------


class TorchInt4Cpu(Kernel):
    name, scheme, layout = "torch", "int4", "torch-int4pack-cpu"
    serves_rows = False  # its own tiling: rows cannot be read back cheaply

    def unusable(self, shape: tuple[int, int], group_size: int) -> str | None:
        return (
            f"needs output sizes that are multiples of 16 ({shape[0]})" if shape[0] % 16 else None
        )

    def pack(self, weight: QuantizedTensor, device: torch.device) -> Packed:
        # The op takes int32 (out, in) values 0..15, packed in row chunks (multiples of its
        # 64-row blocks, so the chunks concatenate to the packing of the whole): an int32 copy
        # of a whole matrix would be 8x its int4 bytes.
        out = weight.shape[0]
        step = 512
        q = torch.cat(
            [
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                    weight.rows(slice(start, start + step)).unpacked().to(torch.int32), 2
                )
                for start in range(0, out, step)
            ]
        )
        return _torch_int4(q, weight, device)

    def run(self, packed: Packed, x: torch.Tensor) -> torch.Tensor:
        return _run_torch_int4(torch.ops.aten._weight_int4pack_mm_for_cpu, packed, x)


class TorchInt4Cuda(Kernel):
    name, scheme, device_type, layout = "torch", "int4", "cuda", "torch-int4pack-cuda"
    serves_rows = False

    def unusable(self, shape: tuple[int, int], group_size: int) -> str | None:
        if shape[0] % 16:
            return f"needs output sizes that are multiples of 16 ({shape[0]})"
        if shape[1] % 32:
            return f"needs an input size that is a multiple of 32 ({shape[1]})"
        return None

    def pack(self, weight: QuantizedTensor, device: torch.device) -> Packed:
        # uint8 (out, in/2) with column 2j in the HIGH nibble, then the op's own tiling.
        values = weight.unpacked()
        swapped = ((values[:, 0::2] << 4) | values[:, 1::2]).to(device)
        cols = weight.shape[1]
        tiles = next(t for t in (8, 4, 2) if cols % (t * 16) == 0)
        return _torch_int4(
            torch.ops.aten._convert_weight_to_int4pack(swapped, tiles), weight, device
        )

    def run(self, packed: Packed, x: torch.Tensor) -> torch.Tensor:
        return _run_torch_int4(torch.ops.aten._weight_int4pack_mm, packed, x)


def _torch_int4(q: torch.Tensor, weight: QuantizedTensor, device: torch.device) -> Packed:
    """torch's int4 layout: its tiled q, and scales and zeros as (in/group, out, 2)."""
    assert weight.zeros is not None
    both = torch.stack([weight.scales, weight.zeros], dim=-1).transpose(0, 1)
    return {
        "q": q,
        "scales_and_zeros": both.to(device, KERNEL_DTYPE).contiguous(),
        "group_size": weight.group_size,
    }


def _run_torch_int4(op: Any, packed: Packed, x: torch.Tensor) -> torch.Tensor:
    """torch's int4 matrix product (CPU or CUDA op): bf16 activations."""
    return op(
        x.to(KERNEL_DTYPE).contiguous(),
        packed["q"],
        packed["group_size"],
        packed["scales_and_zeros"],
    )


class Avx2Int4(CakeKernel):
    name, scheme, layout = "avx2", "int4", "cake-int4"

    def run(self, packed: Packed, x: torch.Tensor) -> torch.Tensor:
        lib = native.library()
        x = x.to(torch.float32).contiguous()
        q, scales = packed["q"], packed["scales"]
        (rows, cols), out = x.shape, q.shape[0]
        y = torch.empty(rows, out, dtype=torch.float32)
        lib.cake_int4_linear(
            x.data_ptr(), rows, cols, q.data_ptr(), scales.data_ptr(), _zeros_pointer(packed),
            out, packed["group_size"], y.data_ptr(), native.threads(),
        )  # fmt: skip
        return y


class DequantGemmInt4(CakeKernel):
    name, scheme, layout = "dequant-gemm", "int4", "cake-int4"

    def run(self, packed: Packed, x: torch.Tensor) -> torch.Tensor:
        lib = native.library()
        q, scales, zeros = packed["q"], packed["scales"], _zeros_pointer(packed)
        group = packed["group_size"]

        def dequantize(start: int, end: int, tile: torch.Tensor) -> None:
            lib.cake_int4_dequantize(
                q.data_ptr(), scales.data_ptr(), zeros, tile.shape[1], group,
                start, end, tile.data_ptr(), native.threads(),
            )  # fmt: skip

        return tiled_gemm(x, q.shape[0], dequantize)


# --- int8 ------------------------------------------------------------------------------------


class TorchInt8(Kernel):
    name, scheme, layout = "torch", "int8", "cake-int8"

    def pack(self, weight: QuantizedTensor, device: torch.device) -> Packed:
        return _cake_int8(weight, device)

    def run(self, packed: Packed, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(
            x.to(KERNEL_DTYPE).contiguous(), packed["q"], packed["scales"]
        )


class TorchInt8Cuda(TorchInt8):
    device_type = "cuda"


class Avx2Int8(CakeKernel):
    name, scheme, layout = "avx2", "int8", "cake-int8"

    def run(self, packed: Packed, x: torch.Tensor) -> torch.Tensor:
        lib = native.library()
        x = x.to(torch.float32).contiguous()
        q, scales = packed["q"], packed["scales"]
        (rows, cols), out = x.shape, q.shape[0]
        y = torch.empty(rows, out, dtype=torch.float32)
        lib.cake_int8_linear(
            x.data_ptr(), rows, cols, q.data_ptr(), scales.data_ptr(), out, y.data_ptr(),
            native.threads(),
        )  # fmt: skip
        return y


class DequantGemmInt8(CakeKernel):
    name, scheme, layout = "dequant-gemm", "int8", "cake-int8"

    def run(self, packed: Packed, x: torch.Tensor) -> torch.Tensor:
        lib = native.library()
        q, scales = packed["q"], packed["scales"]

        def dequantize(start: int, end: int, tile: torch.Tensor) -> None:
            lib.cake_int8_dequantize(
                q.data_ptr(), scales.data_ptr(), tile.shape[1], start, end, tile.data_ptr(),
                native.threads(),
            )  # fmt: skip

        return tiled_gemm(x, q.shape[0], dequantize)


class FbgemmInt8(Kernel):
    name, scheme, layout = "fbgemm", "int8", "fbgemm"
    serves_rows = False  # the packed weight cannot hand out embedding rows cheaply

    def unusable(self, shape: tuple[int, int], group_size: int) -> str | None:
        engines = torch.backends.quantized.supported_engines
        return None if "fbgemm" in engines else "this torch build has no fbgemm"

    def pack(self, weight: QuantizedTensor, device: torch.device) -> Packed:
        out = weight.shape[0]
        with warnings.catch_warnings():  # quantized tensors are deprecated; the op is not
            warnings.simplefilter("ignore")
            q = torch._make_per_channel_quantized_tensor(
                weight.q, weight.scales.double(), torch.zeros(out, dtype=torch.long), 0
            )
            return {"fbgemm": torch.ops.quantized.linear_prepack(q, None)}

    def run(self, packed: Packed, x: torch.Tensor) -> torch.Tensor:
        # reduce_range: 7-bit activations, which fbgemm's x86 kernels need to avoid overflow.
        return torch.ops.quantized.linear_dynamic(
            x.to(torch.float32).contiguous(), packed["fbgemm"], True
        )


# --- any format: dense after dequantization (memory for speed, when asked) -------------------


class Dense(Kernel):
    name, layout, trades_memory = "dense", "dense-bf16", True

    def __init__(self, scheme: str, device_type: str) -> None:
        self.scheme, self.device_type = scheme, device_type  # type: ignore[misc]

    def pack(self, weight: QuantizedTensor, device: torch.device) -> Packed:
        return {"weight": weight.dequantize(KERNEL_DTYPE).to(device)}

    def run(self, packed: Packed, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(KERNEL_DTYPE), packed["weight"])


def tiled_gemm(x: torch.Tensor, out: int, dequantize: Any) -> torch.Tensor:
    """x @ W.T with W dequantized a tile of rows at a time into one reused f32 buffer."""
    x = x.to(torch.float32).contiguous()
    cols = x.shape[1]
    tile_rows = max(16, min(out, TILE_BYTES // (4 * cols)))
    tile = torch.empty(tile_rows, cols, dtype=torch.float32)
    y_t = torch.empty(out, x.shape[0], dtype=torch.float32)
    x_t = x.t()
    for start in range(0, out, tile_rows):
        end = min(start + tile_rows, out)
        dequantize(start, end, tile)
        torch.mm(tile[: end - start], x_t, out=y_t[start:end])
    return y_t.t()


KERNELS: tuple[Kernel, ...] = (
    TorchInt4Cpu(),
    Avx2Int4(),
    DequantGemmInt4(),
    TorchInt4Cuda(),
    TorchInt8(),
    Avx2Int8(),
    DequantGemmInt8(),
    FbgemmInt8(),
    TorchInt8Cuda(),
    Dense("int4", "cpu"),
    Dense("int8", "cpu"),
    Dense("int4", "cuda"),
    Dense("int8", "cuda"),
)

NAMES = tuple(dict.fromkeys(k.name for k in KERNELS))


def candidates(scheme: str, device_type: str) -> list[Kernel]:
    return [k for k in KERNELS if k.scheme == scheme and k.device_type == device_type]
