"""`--device` and `--dtype`: what `auto` picks, in one place for master and workers; and the
weight layout each device multiplies fastest (asked by `cake.model.llama.Projection` at load)."""

from __future__ import annotations

import logging
import os
import re

import torch

log = logging.getLogger(__name__)


# torch's MPS backend aborts the process (no Python error) on SDPA with grouped-query attention
# and an attention mask before 2.7, which every Llama 3 prefill needs.
MPS_MIN_TORCH = (2, 7)


# Set to in_out or out_in to force the CPU float32 weight layout (see weight_layout_in_out).
LAYOUT_ENV = "CAKE_WEIGHT_LAYOUT"


DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def resolve_device(name: str) -> torch.device:
    """auto: the first CUDA GPU, else Apple's MPS, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda:0")
        if torch.backends.mps.is_available():
            if mps_supported(torch.__version__):
                return torch.device("mps")
            log.warning("%s; running on the CPU", mps_refusal(torch.__version__))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this torch build has no usable CUDA GPU")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: MPS is not available on this machine")
    if device.type == "mps" and not mps_supported(torch.__version__):
        raise ValueError(mps_refusal(torch.__version__))
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def _version_tuple(version: str) -> tuple[int, ...]:
    """'2.6.0+cu124' -> (2, 6, 0); '2.7.0a0' -> (2, 7, 0)."""
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        match = re.match(r"\d+", piece)
        parts.append(int(match.group()) if match else 0)
    return tuple(parts)


def mps_supported(torch_version: str) -> bool:
    return _version_tuple(torch_version) >= MPS_MIN_TORCH


def mps_refusal(torch_version: str) -> str:
    wanted = ".".join(map(str, MPS_MIN_TORCH))
    return (
        f"--device mps needs torch >= {wanted} (torch {torch_version} aborts in attention with "
        f"grouped-query heads and a mask on MPS); upgrade torch, or use --device cpu"
    )


def computes_bf16_natively(device: torch.device) -> bool:
    """Whether this device itself has bf16 arithmetic: CUDA compute capability 8.0 (Ampere) or
    later. Asked of the device, not of the current one, and not `is_bf16_supported()`, which also
    says yes where bf16 is only emulated (Pascal, Volta, Turing: several times slower)."""
    if device.type != "cuda":
        return False
    return tuple(torch.cuda.get_device_capability(device)) >= (8, 0)


def compute_dtype(
    name: str, device: torch.device, quantized: torch.dtype | None = None
) -> torch.dtype:
    """The dtype blocks compute in: `auto` is `quantized` for quantized weights (what their
    kernels take: cake.model.kernels.probe.activations_dtype), else what resolve_dtype picks."""
    if name == "auto" and quantized is not None:
        return quantized
    return resolve_dtype(name, device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs that compute it natively, f16 on older GPUs and MPS, f32 on the CPU."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"--dtype {name!r}: use auto, f32, f16 or bf16")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if computes_bf16_natively(device) else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def weight_layout_in_out(
    device: torch.device, dtype: torch.dtype, out_features: int, in_features: int
) -> bool:
    """Whether a weight (out, in) is best stored transposed, (in, out), for `x @ W`.

    A decode step is one row times each matrix, streamed from memory. On the CPU in float32,
    (in, out) streams faster when out >= in (bench/layout.py: 1.1-1.6x on AMD EPYC, Zen 2-4;
    2.8x for SmolLM2's head), and not for narrow outputs; bf16/f16 kernels stream (out, in)
    faster (0.6-0.9x transposed), and GPUs are fastest with the checkpoint's (out, in). The
    measurements so far (docs/bench/) agree on every CPU met; CAKE_WEIGHT_LAYOUT=in_out or
    out_in overrides it for float32 on a CPU where `python -m bench.layout` says otherwise.
    """
    if device.type != "cpu" or dtype != torch.float32:
        return False
    forced = os.environ.get(LAYOUT_ENV, "").strip().lower()
    if forced in ("in_out", "out_in"):
        return forced == "in_out"
    if forced not in ("", "auto"):
        raise ValueError(f"{LAYOUT_ENV}={forced!r}: use in_out, out_in or auto")
    return out_features >= in_features
