"""Issue 22's mixture-of-experts measurement: decode speed follows the active parameters.

    python -m bench.moe [--blocks 2] [--steps 32] [--rounds 5]

Two random-weight models written once as Q4_0 GGUF files (bench.gguf_writer, never in float)
into the cake cache, `--blocks` blocks each, of Qwen3-30B-A3B's block shape (hidden 2048, 32
query and 4 KV heads of 128):
- moe: its router and 128 experts of 768 (8 routed per token), as published (arch qwen3moe);
- dense: the same attention and one MLP of 8 x 768 = 6144 (arch llama), so a token reads the
  same number of weights in both.
Both are loaded as cake loads any GGUF (int4, the measured kernels), then timed round-robin over
`--rounds` rounds: decode steps after a 64-token prompt, the fastest round of each. Prints the
markdown table (tok/s through the blocks, ratio moe / dense; the goal is >= 0.6) and writes
bench/results/moe.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.gguf_writer import QWEN3_30B_A3B, write_random_q4_0_gguf, write_random_qwen3moe_q4_0_gguf
from bench.machine import cpu_label, machine_info
from cake.host.cache import cache_root
from cake.model.config import LlamaConfig
from cake.model.opener import open_model

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = 64


def write_models(blocks: int) -> dict[str, Path]:
    """The two GGUF files (written once)."""
    folder = cache_root() / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    moe = {**QWEN3_30B_A3B, "num_hidden_layers": blocks}
    dense = {
        **{k: moe[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads")},
        **{k: moe[k] for k in ("head_dim", "vocab_size", "rms_norm_eps", "rope_theta")},
        "num_hidden_layers": blocks,
        "intermediate_size": moe["num_experts_per_tok"] * moe["moe_intermediate_size"],
        "max_position_embeddings": 4096,
    }
    paths = {
        "moe": folder / f"qwen3-30b-a3b-shape-{blocks}-blocks-q4_0.gguf",
        "dense": folder / f"dense-same-active-{blocks}-blocks-q4_0.gguf",
    }
    if not paths["moe"].is_file():
        write_random_qwen3moe_q4_0_gguf(paths["moe"], moe)
    if not paths["dense"].is_file():
        write_random_q4_0_gguf(paths["dense"], dense)
    return paths


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
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    models, parts = {}, {}
    for name, path in write_models(args.blocks).items():
        opened = open_model(path)
        compute = opened.compute("cpu", "auto", None, PROMPT + args.steps + 1)
        models[name] = opened.config
        parts[name] = opened.load(compute, list(range(args.blocks)))
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
        f"the Qwen3-30B-A3B shape, Q4_0 GGUF (int4), "
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
