"""Decode's matrix-vector products in both weight layouts, f32 and bf16.

    .venv/bin/python -m bench.layout [--repeats 50]

A decode step multiplies one row by every weight matrix, so its speed is how fast each layout
streams from memory: the checkpoint's (out, in) through `F.linear`, or (in, out) through
`x @ W` (what `cake.model.llama.Projection` stores on the CPU when out >= in). Shapes are those of
Llama 3.2 1B and SmolLM2-135M; the two layouts are timed alternately, median of `--repeats`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {  # name: (in_features, out_features)
    "1B q|k|v": (2048, 3072),
    "1B gate|up": (2048, 16384),
    "1B down": (8192, 2048),
    "1B head": (2048, 128256),
    "135M gate|up": (576, 3072),
    "135M down": (1536, 576),
    "135M head": (576, 49152),
}


def _median_s(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def compare(in_features: int, out_features: int, dtype: torch.dtype, repeats: int) -> dict:
    out_in = torch.randn(out_features, in_features, dtype=dtype)  # the checkpoint's layout
    in_out = out_in.t().contiguous()
    x = torch.randn(1, in_features, dtype=dtype)  # (1, in): one decode position
    linear = _median_s(lambda: F.linear(x, out_in), repeats)
    matmul = _median_s(lambda: x @ in_out, repeats)
    size = out_in.numel() * out_in.element_size()
    return {"out_in_gb_s": size / linear / 1e9, "in_out_gb_s": size / matmul / 1e9}


def measure_layout(repeats: int = 50, shapes: dict | None = None) -> list[dict]:
    """One row per matrix and dtype: GB/s of weights streamed in each layout."""
    rows = []
    for name, (n_in, n_out) in (shapes or SHAPES).items():
        for dtype in (torch.float32, torch.bfloat16):
            r = compare(n_in, n_out, dtype, repeats)
            rows.append({"matrix": name, "in": n_in, "out": n_out, "dtype": str(dtype)[6:], **r})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    print(f"{options.threads} threads, torch {torch.__version__}\n")
    print("| matrix (in → out) | dtype | (out, in) F.linear GB/s | (in, out) x @ W GB/s | ratio |")
    print("|---|---|---|---|---|")
    for r in measure_layout(options.repeats):
        print(
            f"| {r['matrix']} ({r['in']} → {r['out']}) | {r['dtype']} "
            f"| {r['out_in_gb_s']:.1f} | {r['in_out_gb_s']:.1f} "
            f"| {r['in_out_gb_s'] / r['out_in_gb_s']:.2f}× |"
        )


if __name__ == "__main__":
    main()
