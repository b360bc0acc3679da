"""`--device` and `--dtype`: what `auto` picks, in one place for master and workers."""

from __future__ import annotations

import contextlib
import ctypes
import sys

import torch

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def resolve_device(name: str) -> torch.device:
    """auto: the first CUDA GPU, else Apple's MPS, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda:0")
        if torch.backends.mps.is_available():
            return torch.device("mps")
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
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA GPUs that support it, f16 on other GPUs and MPS, f32 on the CPU."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"--dtype {name!r}: use auto, f32, f16 or bf16")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def release_free_memory() -> None:
    """Give memory that freed tensors left in the C heap back to the system (glibc only).

    Loading frees each block's checkpoint tensors once they are packed, and a prefill frees
    large activations; glibc keeps such holes in its heap, so a worker would hold ~30% more
    than its blocks need. malloc_trim returns them. (A fixed low mmap threshold would too, but
    then every large temporary costs fresh page faults: prefill ran 25% slower.)
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
