"""Issue 22's mixture-of-experts measurement: decode speed follows the active parameters.

    python -m bench.moe [--blocks 4] [--quantize int4] [--steps 32] [--rounds 5]

Two random-weight models of Qwen3-30B-A3B's block shape (hidden 2048, 32 query and 4 KV heads of
128, rope 1e6), `--blocks` blocks each, quantized alike:
- moe: its router and 128 experts of 768 (8 routed per token), as published;
- dense: the same attention and one MLP of 8 x 768 = 6144, so a token reads the same number of
  active weights (the routed experts' and the attention's) in both.
Both are built in this process (cake/model/loader.random_part, no checkpoint), then timed
round-robin over `--rounds` rounds: decode steps after a 64-token prompt, the fastest round of
each. Prints the markdown table (tok/s through the blocks, ratio moe / dense; the goal is
>= 0.6) and writes bench/results/moe.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.machine import cpu_label, machine_info
from cake.model.config import LlamaConfig
from cake.model.loader import random_part
from cake.model.quant import Quantization

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = 64

QWEN3_30B_A3B = {  # the published config.json's shape fields
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
}


def configs(blocks: int) -> dict[str, LlamaConfig]:
    moe = {**QWEN3_30B_A3B, "num_hidden_layers": blocks}
    dense = {k: v for k, v in moe.items() if not k.startswith(("num_experts", "moe_", "norm_topk"))}
    dense.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"])
    dense["intermediate_size"] = moe["num_experts_per_tok"] * moe["moe_intermediate_size"]
    return {
        "moe": LlamaConfig.from_dict(moe, "Qwen3-30B-A3B shape"),
        "dense": LlamaConfig.from_dict(dense, "dense, same active parameters"),
    }


def active_weights(config: LlamaConfig) -> int:
    c = config
    attention = c.hidden_size * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    inner = c.experts_per_token * c.expert_intermediate_size if c.n_experts else c.intermediate_size
    return c.n_layers * (attention + 3 * c.hidden_size * inner)


def decode_seconds(part, config: LlamaConfig, steps: int) -> float:
    cache = part.new_cache(PROMPT + steps + 1)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        prompt = torch.randn(1, PROMPT, config.hidden_size, generator=generator)
        part.run_blocks(prompt.to(part.dtype), 0, cache, part.blocks)
        hidden = torch.randn(1, 1, config.hidden_size, generator=generator).to(part.dtype)
        start = time.perf_counter()
        for step in range(steps):
            # A different input each step, so each step routes to other experts.
            part.run_blocks(hidden + 0.1 * step, PROMPT + step, cache, part.blocks)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--quantize", default="int4", choices=["int4", "int8"])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    quantization = Quantization(args.quantize)
    models = configs(args.blocks)
    parts = {}
    for name, config in models.items():
        started = time.perf_counter()
        parts[name] = random_part(
            config, list(range(args.blocks)), torch.float32, torch.device("cpu"), quantization,
            max_seq_len=PROMPT + args.steps + 1,
        )  # fmt: skip
        print(f"built {name} in {time.perf_counter() - started:.0f} s", flush=True)
    best = dict.fromkeys(models, float("inf"))
    for _ in range(args.rounds):
        for name, part in parts.items():
            best[name] = min(best[name], decode_seconds(part, models[name], args.steps))
    rows = {
        name: {
            "tok_s": args.steps / best[name],
            "active_weights": active_weights(models[name]),
            "all_weights": sum(p.numel() for p in parts[name].buffers())
            + sum(p.numel() for p in parts[name].parameters()),
        }
        for name in models
    }
    ratio = rows["moe"]["tok_s"] / rows["dense"]["tok_s"]
    machine = machine_info(torch.get_num_threads())
    lines = [
        f"Machine: {cpu_label(machine)}, torch {machine['torch']}. {args.blocks} blocks of "
        f"the Qwen3-30B-A3B shape, {args.quantize}, "
        f"f32 activations, decode after a {PROMPT}-token prompt, best of {args.rounds} rounds "
        f"of {args.steps} steps.",
        "",
        "| model | active weights | stored values | decode tok/s (blocks only) |",
        "|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['active_weights'] / 1e6:.0f} M | {row['all_weights'] / 1e6:.0f} M "
            f"| {row['tok_s']:.1f} |"
        )
    lines += ["", f"moe / dense: **{ratio:.2f}x** (goal >= 0.6x)"]
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "moe.json").write_text(
        json.dumps({"machine": machine, "args": vars(args), "rows": rows, "ratio": ratio}, indent=1)
    )


if __name__ == "__main__":
    main()
