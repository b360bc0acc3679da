"""The projection modules a block is built of: dense, quantized, or parts of both.

`QuantizedLinear` runs one quantized weight (or several fused along the output) through the
kernels chosen for it on this machine (cake/model/kernels/probe.py): one for decode-shaped
inputs (a few rows), one for prefill-shaped ones, both reading the same packed copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cake.model.gguf.mapped import MappedBlocks
from cake.model.kernels.probe import DECODE_ROWS, Choice, choose
from cake.model.llama import Projection
from cake.model.mapped_linear import MappedEmbedding, MappedLinear, mapped_kernels
from cake.model.quant import DEFAULT_GROUP_SIZE, QuantizedTensor, Weight, quantize


@dataclass(frozen=True)
class PackedLayout:
    """What a QuantizedLinear's packed tensors stand for: enough to rebuild the module around
    them (from_packed) without the weight they were packed from."""

    scheme: str
    group_size: int
    shape: tuple[int, int]  # (out, in)
    serves_rows: bool
    logits: bool
    kernel_layout: str  # the decode kernel's layout (candidates.Kernel.layout)


def _on(value: object, device: torch.device) -> object:
    return value.to(device) if isinstance(value, torch.Tensor) else value


class QuantizedLinear(nn.Module):
    """y = x @ W.T for a quantized W, through the kernels chosen for its format and shape.

    serves_rows: W doubles as the embedding table (a tied head), so the kept layout must hand
    out rows (`rows`).
    logits: W is the LM head, whose outputs are compared with each other to pick a token, so
    its kernel is held to probe.LOGITS_BOUND where one meets it.
    """

    def __init__(
        self,
        weight: QuantizedTensor,
        device: torch.device,
        dtype: torch.dtype,
        serves_rows: bool = False,
        logits: bool = False,
    ) -> None:
        super().__init__()
        check_supported(weight.scheme, device, weight.group_size)
        choice = choose(weight.scheme, weight.shape, weight.group_size, device, serves_rows, logits)
        self._keep(weight.scheme, weight.group_size, weight.shape, choice, dtype)
        self.serves_rows, self.logits = serves_rows, logits
        self._hold(self.decode_kernel.pack(weight, device))

    @classmethod
    def from_packed(
        cls,
        layout: PackedLayout,
        packed: dict,
        device: torch.device,
        dtype: torch.dtype,
    ) -> QuantizedLinear | None:
        """The module over a weight already packed for `layout` (the packed-weight cache):
        None when the kernels chosen here now read another layout, so the caller packs anew."""
        scheme, group_size, shape = layout.scheme, layout.group_size, layout.shape
        check_supported(scheme, device, group_size)
        choice = choose(scheme, shape, group_size, device, layout.serves_rows, layout.logits)
        if choice.decode.layout != layout.kernel_layout:
            return None
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._keep(scheme, group_size, shape, choice, dtype)
        module.serves_rows, module.logits = layout.serves_rows, layout.logits
        module._hold({name: _on(value, device) for name, value in packed.items()})
        return module

    def _keep(
        self,
        scheme: str,
        group_size: int,
        shape: tuple[int, int],
        choice: Choice,
        dtype: torch.dtype,
    ) -> None:
        self.scheme, self.group_size = scheme, group_size
        self.out_features, self.in_features = shape
        self.dtype = dtype  # the stage's activations: what forward returns, rows() too
        self.choice = choice
        self.decode_kernel, self.prefill_kernel = choice.decode, choice.prefill

    def _hold(self, packed: dict) -> None:
        """Tensors become buffers (they follow .to()), anything else (ints, an fbgemm handle)
        stays in `packed`."""
        self.packed: dict = {}
        for name, value in packed.items():
            if isinstance(value, torch.Tensor):
                self.register_buffer(name, value)
            else:
                self.packed[name] = value
        self._all: dict | None = None  # packed values and buffers, gathered once per layout

    def layout(self) -> PackedLayout:
        """What its packed weight is, for the packed-weight cache."""
        return PackedLayout(
            self.scheme,
            self.group_size,
            (self.out_features, self.in_features),
            self.serves_rows,
            self.logits,
            self.decode_kernel.layout,
        )

    def _packed(self) -> dict:
        if self._all is None:
            self._all = {**self.packed, **dict(self.named_buffers(recurse=False))}
        return self._all

    def packed_values(self) -> dict:
        """The packed weight as its kernels read it: buffers and plain values by name."""
        return dict(self._packed())

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        self._all = None  # .to(), .half(), ... replace the buffers: gather them again
        return super()._apply(fn, recurse)

    def describe(self) -> str:
        return "int8" if self.scheme == "int8" else f"int4/g{self.group_size}"

    def kernels(self) -> str:
        return self.choice.describe()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        kernel = self.decode_kernel if x2.shape[0] <= DECODE_ROWS else self.prefill_kernel
        y = kernel.run(self._packed(), x2)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows of W (a tied head doubles as the embedding table), from a layout
        that keeps them (kernels whose `serves_rows` is set)."""
        packed = self._packed()
        if "weight" in packed:  # the dense kernel keeps the dequantized weight
            return packed["weight"][ids].to(self.dtype)
        if not self.decode_kernel.serves_rows or "q" not in packed:
            raise ValueError(f"{self.decode_kernel.name} keeps no embedding rows (rows)")
        q, scales = packed["q"], packed["scales"]
        if self.scheme == "int8":
            return (q[ids].to(torch.float32) * scales[ids, None].float()).to(self.dtype)
        flat = ids.reshape(-1)
        zeros = packed["zeros"][flat] if "zeros" in packed else torch.zeros_like(scales[flat])
        picked = QuantizedTensor("int4", q[flat], scales[flat], zeros, self.group_size)
        return picked.dequantize(self.dtype).reshape(*ids.shape, self.in_features)


def check_supported(
    scheme: str, device: torch.device, group_size: int = DEFAULT_GROUP_SIZE
) -> None:
    """Raise a ValueError naming the fix when `device` has no kernel for `scheme`."""
    if device.type == "cpu":
        return
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if scheme == "int4" and major < 8:
            raise ValueError(
                f"--quantize int4 on {device} needs an sm80+ GPU (Ampere or newer); this one is "
                f"sm{major}{minor}: use --quantize int8 or run without --quantize"
            )
        if scheme == "int4" and group_size not in (32, 64, 128, 256):
            raise ValueError(f"int4 on CUDA takes group sizes 32-256, not {group_size}")
        return
    raise ValueError(
        f"quantized weights ({scheme}) run on the CPU and on CUDA GPUs only, not on "
        f"{device.type}; run without --quantize (and not from a GGUF file) on this device"
    )


class ConcatProjection(nn.Module):
    """Several projections whose outputs are concatenated: a fused q|k|v whose parts a GGUF file
    stores in different formats (Q4_K_M files keep some v weights in Q6_K)."""

    def __init__(self, parts: Sequence[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.out_features = sum(p.out_features for p in parts)

    def describe(self) -> str:
        kinds = [describe(p) for p in self.parts]
        return kinds[0] if len(set(kinds)) == 1 else "+".join(kinds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def build_projection(
    parts: Sequence[Weight | MappedBlocks],
    quantize_to: str | None,
    device: torch.device,
    dtype: torch.dtype,
    group_size: int = DEFAULT_GROUP_SIZE,
    serves_rows: bool = False,
    logits: bool = False,
) -> nn.Module:
    """The final module for one (possibly fused) projection, built from its checkpoint weights.

    Float weights are quantized to `quantize_to` (or kept dense in `dtype` when None); weights
    that are already quantized (GGUF, quantized bundles) are used as they are: GGUF blocks
    mapped from the file run where they lie when this machine's kernels read them so
    (mapped_linear.py), else they are converted. Parts quantized differently cannot share one
    kernel call, so they run side by side (ConcatProjection).
    """
    mapped = [p for p in parts if isinstance(p, MappedBlocks)]
    choice = mapped_kernels(mapped, device, serves_rows, logits) if mapped == parts else None
    if choice is not None:
        modules = [MappedLinear(p, dtype, choice) for p in mapped]
        return modules[0] if len(modules) == 1 else ConcatProjection(modules)
    weights = [p.to_quantized() if isinstance(p, MappedBlocks) else p for p in parts]
    quantized = [
        part
        if isinstance(part, QuantizedTensor) or quantize_to is None
        else quantize(part, quantize_to, group_size)
        for part in weights
    ]
    if all(isinstance(p, torch.Tensor) for p in quantized):
        return Projection([p.to(device=device, dtype=dtype) for p in quantized])
    kinds = {
        (p.scheme, p.group_size) if isinstance(p, QuantizedTensor) else None for p in quantized
    }
    if len(kinds) == 1:
        return QuantizedLinear(QuantizedTensor.cat(quantized), device, dtype, serves_rows, logits)
    return ConcatProjection(
        [build_projection([p], None, device, dtype, group_size) for p in quantized]
    )


def describe(module: nn.Module) -> str:
    """What a projection module runs: 'int8', 'int4/g32', 'bf16', ..."""
    if isinstance(module, (QuantizedLinear, ConcatProjection, MappedLinear, MappedEmbedding)):
        return module.describe()
    weight = getattr(module, "weight", None)
    return str(weight.dtype).removeprefix("torch.") if weight is not None else "?"


def kernels_of(modules: Sequence[nn.Module]) -> dict[str, str]:
    """{format: kernels} over the quantized modules among `modules` (for the load log and
    --stats): {'int4/g32': 'avx2 decode, dequant-gemm prefill', 'int8': 'avx2'}."""
    found: dict[str, str] = {}
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, (QuantizedLinear, MappedLinear)):
                found.setdefault(sub.describe(), sub.kernels())
    return found
