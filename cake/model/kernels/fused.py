"""Small f32 operations of a block in one native call each (cpu_avx2.cpp): RMSNorm, the rotary
embedding of q and k in place in the fused q|k|v output, and SwiGLU's silu(gate) * up.

On the CPU a torch operator costs a few microseconds however small its tensor, and a decode
step of a small model is mostly such operators: RMSNorm as written in the reference is six of
them (~50 us on 576 values here), rotary on q and k fourteen. Each function returns None / False
when it does not apply (not f32 on the CPU, not contiguous, no native library, or `--kernels
torch`), and the caller runs the torch version, which stays the reference.
"""

from __future__ import annotations

import torch

from cake.model.kernels import native, probe


def _usable(*tensors: torch.Tensor) -> bool:
    if probe.named() == "torch" or native.library() is None:
        return False
    for t in tensors:  # a loop, not all(genexpr): this runs a few times per block and step
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            return False
    return True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension; None: use torch."""
    if not _usable(x, weight):
        return None
    out = torch.empty_like(x)
    columns = x.shape[-1]
    native.library().cake_rms_norm(
        x.data_ptr(), x.numel() // columns, columns, weight.data_ptr(), eps, out.data_ptr()
    )
    return out


def rope_in_place(
    qkv: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor
) -> bool:
    """Rotate the first `heads` heads (q, then k) of each row of qkv (..., row) in place, row r
    at position row r % len(cos) of the (T, head_dim) tables; False: use torch."""
    if not _usable(qkv, cos, sin):
        return False
    row = qkv.shape[-1]
    native.library().cake_rope(
        qkv.data_ptr(), qkv.numel() // row, row, heads, head_dim,
        cos.data_ptr(), sin.data_ptr(), cos.shape[0],
    )  # fmt: skip
    return True


def silu_mul(gate_up: torch.Tensor, inner: int) -> torch.Tensor | None:
    """silu(gate) * up from a fused (..., 2 * inner) gate|up output; None: use torch."""
    if not _usable(gate_up):
        return None
    out = gate_up.new_empty(*gate_up.shape[:-1], inner)
    rows = gate_up.numel() // (2 * inner)
    native.library().cake_silu_mul(gate_up.data_ptr(), rows, inner, out.data_ptr())
    return out
