"""The GPU check's third part: quantized kernels and batched steps on a CUDA device.

    python -m bench.gpu_quant [--device cuda:0]

* Each quantized projection (int8 per channel, int4 in groups of 32; one matrix and a fused
  q|k|v stack) against its own dequantized weights in f32, on the GPU: relative error of the
  output, and time per decode-sized product against the bf16 dense one.
* A batched step (several sessions' rows, `Llama.run_segments`) against each session alone on
  the GPU, for a random Llama-shaped model, in bf16.

Prints one markdown table; exit status 1 if any error is beyond its tolerance.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from cake.model.config import LlamaConfig
from cake.model.kv_cache import Segment
from cake.model.linear import build_projection
from cake.model.loader import random_part
from cake.model.quant import quantize

TOLERANCE = {"int8": 0.02, "int4": 0.02}  # relative error vs dequantized f32 (bf16 inputs)


def _time(fn, device: torch.device, repeats: int = 50) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _: None)
    for _ in range(5):
        fn()
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - started) / repeats


def kernels(device: torch.device) -> list[tuple[str, float, float, bool]]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    shapes = {"4096x4096": [(4096, 4096)], "q+k+v 4096": [(4096, 4096), (1024, 4096), (1024, 4096)]}
    for name, parts in shapes.items():
        weights = [torch.randn(shape, generator=generator) * 0.02 for shape in parts]
        x = torch.randn(1, 1, parts[0][1], generator=generator).to(device, torch.bfloat16)
        dense = build_projection(weights, None, device, torch.bfloat16)
        dense_s = _time(lambda: dense(x), device)  # noqa: B023
        for scheme in ("int8", "int4"):
            quantized = [quantize(w, scheme) for w in weights]
            module = build_projection(quantized, None, device, torch.bfloat16)
            reference = torch.cat(
                [q.dequantize().to(device) for q in quantized], dim=0
            )  # (out, in)
            got = module(x).float()
            want = x.float() @ reference.float().t()
            error = float((got - want).norm() / want.norm())
            seconds = _time(lambda: module(x), device)  # noqa: B023
            rows.append((f"{name} {scheme}", error, dense_s / seconds, error <= TOLERANCE[scheme]))
    return rows


def batched_step(device: torch.device) -> tuple[float, bool]:
    config = LlamaConfig.from_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 512,
            "intermediate_size": 1536,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "vocab_size": 1000,
            "max_position_embeddings": 512,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
        }
    )
    part = random_part(config, range(4), torch.bfloat16, device, max_seq_len=256)
    generator = torch.Generator().manual_seed(1)
    lengths = [(0, 9), (0, 1), (0, 17)]  # (start, rows) of three sessions' first step
    hidden = [
        torch.randn(1, n, 512, generator=generator).to(device, torch.bfloat16) for _, n in lengths
    ]
    worst = 0.0
    with torch.inference_mode():
        alone = [part.run_blocks(h, 0, part.new_cache(256), part.blocks) for h in hidden]
        caches = [part.new_cache(256) for _ in hidden]
        segments, offset = [], 0
        for cache, (start, n) in zip(caches, lengths, strict=True):
            segments.append(Segment(cache, start, offset, n))
            offset += n
        batched = part.run_segments(torch.cat(hidden, dim=1), segments, part.blocks)
        for segment, one in zip(segments, alone, strict=True):
            got = batched[:, segment.offset : segment.offset + segment.length].float()
            worst = max(worst, float((got - one.float()).abs().max()))
    return worst, worst <= 0.05  # bf16: same math, other kernel shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda:0")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("bench.gpu_quant: error: no CUDA GPU here (--device cpu for a dry run)")
        major, minor = torch.cuda.get_device_capability(device)
        name = f"{torch.cuda.get_device_name(device)} (sm{major}{minor})"
    else:
        name = f"{device} (dry run)"
    print(f"\n{name}, torch {torch.__version__}\n")
    print("| quantized projection | rel. error vs dequantized f32 | speed vs bf16 dense | ok |")
    print("|---|---|---|---|")
    ok = True
    try:
        for name, error, speed, good in kernels(device):
            print(f"| {name} | {error:.4f} | {speed:.2f}x | {'yes' if good else 'NO'} |")
            ok &= good
    except (RuntimeError, ValueError) as exc:  # a kernel this GPU lacks: say so
        print(f"| quantized kernels | failed: {str(exc).splitlines()[0]} | | NO |")
        ok = False
    worst, good = batched_step(device)
    print(f"\nbatched step (3 sessions, bf16) vs each alone: max abs diff {worst:.4f} "
          f"({'ok' if good else 'NOT ok'})")  # fmt: skip
    sys.exit(0 if ok and good else 1)


if __name__ == "__main__":
    main()
