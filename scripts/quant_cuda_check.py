"""On a CUDA machine: cake's quantized linears against their dequantized weights, and a decode
step timing of int4/int8/bf16 for a Llama-1B-sized MLP. `python scripts/quant_cuda_check.py`."""

from __future__ import annotations

import time

import torch

from cake.model.linear import build_projection
from cake.model.quant import QuantizedTensor, quantize


def main() -> None:
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(device), torch.__version__)
    torch.manual_seed(0)
    parts = [torch.randn(rows, 2048) for rows in (2048, 512, 512)]
    for scheme in ("int8", "int4"):
        try:
            module = build_projection(parts, scheme, device, torch.bfloat16)
        except Exception as exc:  # report what this torch/GPU refuses
            print(f"{scheme}: refused: {exc}")
            continue
        weight = QuantizedTensor.cat([quantize(p, scheme) for p in parts]).dequantize().to(device)
        x = torch.randn(3, 2048, device=device, dtype=torch.bfloat16)
        reference = x.float() @ weight.t()
        error = (module(x).float() - reference).abs().max().item()
        scale = reference.abs().max().item()
        print(f"{scheme}: max error {error:.4f} of max |y| {scale:.2f} ({error / scale:.2%})")
        assert error <= 0.02 * scale, scheme
    big = [torch.randn(16384, 2048)]
    for label in ("bf16", "int8", "int4"):
        try:
            module = build_projection(big, None if label == "bf16" else label, device,
                                      torch.bfloat16)  # fmt: skip
        except Exception as exc:
            print(f"{label}: refused: {exc}")
            continue
        x = torch.randn(1, 2048, device=device, dtype=torch.bfloat16)
        for _ in range(10):
            module(x)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(200):
            module(x)
        torch.cuda.synchronize()
        print(
            f"{label}: 16384x2048 decode matmul "
            f"{(time.perf_counter() - started) / 200 * 1e6:.1f} us"
        )


if __name__ == "__main__":
    main()
