"""What a device can do, measured: free memory, raw matmul speed, and one block's decode time.

Both ends use it: an empty worker when it starts (and when a master asks, for that master's
model), and the master for itself, since the master is a stage too. The block is built from the
model's config with random weights, so no weights need to be on the device to time it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from cake.host.memory import release_free_memory
from cake.model.config import LlamaConfig
from cake.model.loader import random_part

# Positions a timed decode step attends over; typical of a chat turn, not a worst case.
TIMED_POSITION = 128
TIMED_STEPS = 8
# Share of the free memory a plan may fill: the rest is for activations, allocator slack and
# whatever else the machine runs.
MEMORY_HEADROOM = 0.9


def matmul_mflops(device: torch.device, size: int = 512, repeats: int = 4) -> int:
    """A float32 (size x size) @ (size x size) product, best of `repeats`, in MFLOP/s."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        _sync(device)
        started = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return int(2 * size**3 / max(best, 1e-9) / 1e6)


@dataclass(frozen=True)
class BlockTiming:
    block_ms: float  # one block, one decoded token, at TIMED_POSITION
    block_bytes: int  # its weights plus one session's KV cache of max_seq_len positions


# Bytes a quantized linear weight takes per element: int8 per output channel (plus a bf16 scale
# per row, negligible); int4 in groups of 32 with a bf16 scale and zero point per group.
QUANTIZED_BYTES_PER_WEIGHT = {"int8": 1.0, "int4": 0.5 + 4 / 32}


def block_bytes(
    config: LlamaConfig, dtype: torch.dtype, max_seq_len: int, quantization: str = ""
) -> int:
    """Weights of the largest block (linear ones `quantization`, if given; a mixture-of-experts
    block with all its experts) plus one session's KV cache for it, in `dtype`."""
    from cake.model.layout import block_shapes, is_linear_weight

    per_weight = QUANTIZED_BYTES_PER_WEIGHT.get(quantization, dtype.itemsize)
    largest = 0
    for block in range(config.n_layers):
        shapes = block_shapes(config, block)
        linear = sum(math.prod(s) for name, s in shapes.items() if is_linear_weight(name))
        other = sum(math.prod(s) for name, s in shapes.items() if not is_linear_weight(name))
        largest = max(largest, int(linear * per_weight) + other * dtype.itemsize)
    cache = 2 * config.n_kv_heads * config.head_dim * max_seq_len
    return largest + cache * dtype.itemsize


def time_block(
    config: LlamaConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_seq_len: int,
    quantization: str = "",
) -> BlockTiming:
    """Build one block with random weights (quantized as `quantization` says, if given) on
    `device` and time decode steps through it."""
    from cake.model.quant import Quantization

    positions = min(TIMED_POSITION, max_seq_len - 1)
    part = random_part(
        config,
        [0],
        dtype,
        device,
        Quantization(quantization) if quantization else None,
        max_seq_len=positions + TIMED_STEPS + 4,
    )
    cache = part.new_cache(positions + TIMED_STEPS + 4)
    hidden = torch.randn(1, 1, config.hidden_size, device=device, dtype=dtype)
    times = []
    with torch.inference_mode():
        # The context a decode step reads: written first (a growing cache holds nothing yet).
        context = torch.randn(1, positions, config.hidden_size, device=device, dtype=dtype)
        part.run_blocks(context, 0, cache, [0])
        for step in range(TIMED_STEPS + 2):  # two warm-up steps
            _sync(device)
            started = time.perf_counter()
            part.run_blocks(hidden, positions + step, cache, [0])
            _sync(device)
            times.append(time.perf_counter() - started)
    del part, cache, context, hidden
    # The random block's weights leave holes in the C heap (0.3 GiB for an 8B block) that the
    # blocks loaded next would sit on top of: give them back.
    release_free_memory()
    # The fastest step: anything else running on the device only ever adds time, so the
    # minimum is the steadiest estimate of what the device can do (medians moved 3x between
    # identical workers on a shared 2-core machine).
    return BlockTiming(
        block_ms=min(times[2:]) * 1e3,
        block_bytes=block_bytes(config, dtype, max_seq_len, quantization),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
