"""Projections and embedding tables over GGUF blocks used where they lie (gguf/mapped.py).

`MappedLinear` runs a Q4_0/Q4_1/Q8_0 weight from the mapped file through cake's own kernels
(cpu_avx2.cpp): decode-shaped inputs (at most DECODE_ROWS rows) through `cake_gguf_linear`, the
int4 (int8) kernel's integer dot products on the stored blocks; prefill-shaped ones as f32 tiles
of dequantized rows and the BLAS GEMM. It runs where the measured choice for an int4 (int8)
weight of its shape is cake's avx2 or dequant-gemm kernel (`mapped_kernels`): the same loops
over the same values, nothing to pack. Elsewhere (another kernel measured faster, named with
--kernels, a GPU, no AVX2) the weight is converted (MappedBlocks.to_quantized) and packed as any
GGUF weight.

`MappedEmbedding` is an untied Q4/Q8_0 embedding table looked up from the stored blocks, a row
dequantized per token, so the table is never held in floats (the Llama-3-8B shape's would be
2 GiB).
"""

from __future__ import annotations

import torch
from torch import nn

from cake.host.memory import note_mapped_weights
from cake.model.gguf.mapped import SCHEMES, MappedBlocks
from cake.model.kernels import native, probe
from cake.model.kernels.candidates import tiled_gemm
from cake.model.kernels.probe import DECODE_ROWS

GROUP = 32  # values per GGUF block: the int4 group size Q4 weights are measured as


# The kernels chosen for cake's int4 and int8 layouts that have a twin reading the stored blocks.
TWINS = ("avx2", "dequant-gemm")


def mapped_kernels(
    parts: list[MappedBlocks],
    device: torch.device,
    serves_rows: bool = False,
    logits: bool = False,
) -> probe.Choice | None:
    """The kernels the parts of one projection (fused along the output) run as stored here:
    those measured (or named) for the fused weight's shape, as the converted weight would run,
    where both have a twin on the stored blocks; None where they do not (see the module
    docstring)."""
    if not parts or device.type != "cpu" or native.unavailable_reason() is not None:
        return None
    schemes = {SCHEMES[p.kind] for p in parts}
    if len(schemes) != 1:  # one kernel call cannot run both
        return None
    scheme = schemes.pop()
    shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])
    group = GROUP if scheme == "int4" else 0
    choice = probe.choose(scheme, shape, group, device, serves_rows, logits)
    return choice if {choice.decode.name, choice.prefill.name} <= set(TWINS) else None


def looks_up_mapped(device: torch.device) -> bool:
    """Whether an untied Q4 embedding table is looked up from its mapped blocks here: on the
    CPU with cake's kernels, unless --kernels names another kernel (dense: everything
    dequantized; torch: torch's ops)."""
    usable = device.type == "cpu" and native.unavailable_reason() is None
    return usable and probe.named() in (probe.AUTO, "avx2")


def is_mapped(module: nn.Module) -> bool:
    """Whether a projection runs wholly from mapped blocks (nothing of it to pack or cache)."""
    leaves = [m for m in module.modules() if not list(m.children())]
    return bool(leaves) and all(isinstance(m, MappedLinear) for m in leaves)


def dequantized_rows(weight: MappedBlocks, stored_rows: torch.Tensor, out: torch.Tensor) -> None:
    """Stored rows `stored_rows` (int64) of `weight`, as f32, into `out` (len(rows), in)."""
    native.library().cake_gguf_dequantize(
        weight.data.data_ptr(), weight.block_bytes, weight.shape[1], stored_rows.data_ptr(),
        len(stored_rows), out.data_ptr(), native.threads(),
    )  # fmt: skip


class MappedLinear(nn.Module):
    """y = x @ W.T for a MappedBlocks W (see the module docstring). The blocks are neither a
    parameter nor a buffer: .to() and state_dict leave the mapping alone."""

    def __init__(
        self, weight: MappedBlocks, dtype: torch.dtype, choice: probe.Choice | None = None
    ) -> None:
        super().__init__()
        self.blocks = weight
        # Which inputs take the integer kernel (avx2) rather than dequantized tiles and the GEMM
        # (dequant-gemm), decode-shaped (at most DECODE_ROWS rows) and prefill-shaped ones: as
        # the choice for the converted weight says (no choice: avx2 decode, tiles prefill).
        self.integer_decode = choice is None or choice.decode.name == "avx2"
        self.integer_prefill = choice is not None and choice.prefill.name == "avx2"
        self.choice = choice
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype  # the stage's activations: what forward returns, rows() too
        note_mapped_weights(weight.nbytes)

    def describe(self) -> str:
        return f"{self.blocks.kind.lower()} (mapped)"

    def kernels(self) -> str:
        return self.choice.describe() if self.choice else "avx2 decode, dequant-gemm prefill"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.float32).contiguous()  # (rows, in)
        stored = self.blocks.data.shape[0]
        decode = x2.shape[0] <= DECODE_ROWS
        if self.integer_decode if decode else self.integer_prefill:
            y = torch.empty(x2.shape[0], stored, dtype=torch.float32)
            native.library().cake_gguf_linear(
                x2.data_ptr(), x2.shape[0], self.in_features, self.blocks.data.data_ptr(),
                self.blocks.block_bytes, stored, y.data_ptr(), native.threads(),
            )  # fmt: skip
        else:

            def dequantize(start: int, end: int, tile: torch.Tensor) -> None:
                dequantized_rows(self.blocks, torch.arange(start, end), tile)

            y = tiled_gemm(x2, stored, dequantize)
        if self.blocks.order is not None:  # outputs back in the model's order
            y = y.index_select(1, self.blocks.order)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of W, dequantized (a tied head doubles as the embedding table)."""
        flat = ids.reshape(-1).to(torch.int64)
        if flat.numel() and not 0 <= int(flat.min()) <= int(flat.max()) < self.out_features:
            # the kernel would read past the blocks: an error here, as nn.Embedding raises
            raise IndexError(f"token ids must be in 0-{self.out_features - 1}")
        stored = flat if self.blocks.order is None else self.blocks.order[flat]
        out = torch.empty(len(flat), self.in_features, dtype=torch.float32)
        dequantized_rows(self.blocks, stored.contiguous(), out)
        return out.reshape(*ids.shape, self.in_features).to(self.dtype)


class MappedEmbedding(nn.Module):
    """An embedding table of Q4 blocks in the mapped file, rows dequantized per lookup."""

    def __init__(self, weight: MappedBlocks, dtype: torch.dtype) -> None:
        super().__init__()
        self.table = MappedLinear(weight, dtype)
        self.embedding_dim = weight.shape[1]

    def describe(self) -> str:
        return self.table.describe()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(ids)
