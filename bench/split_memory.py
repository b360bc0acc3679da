"""Peak memory of `cake-split-model` on a Llama-3.2-1B-shaped bf16 checkpoint (random weights).

    .venv/bin/python bench/split_memory.py /tmp/split-bench

builds the model in FOLDER/model (once; reused when present), splits it into two workers plus
the master (FOLDER/out, replaced each run), and prints the split process's peak resident set
next to the model size and the largest tensor. A second child that only imports cake.split
gives the baseline (Python, torch, transformers' tokenizer code) that any split pays.

This process stays small (no torch) and measures its children with wait4: a child's peak RSS
starts from its parent's at fork time, so building the model happens in a child of its own.
The model is written straight with safetensors, shard by shard, so building it needs no
transformers model in memory: hidden 2048, 16 blocks, 32 heads, 8 KV heads, intermediate 8192,
vocabulary 128256, tied embeddings (as Llama 3.2 1B).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "max_position_embeddings": 131072,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}
BLOCKS_PER_SHARD = 6  # 3 shards: the embedding with blocks 0-5, blocks 6-11, blocks 12-15
TOPOLOGY = """\
w1:
  host: '127.0.0.1:10128'
  layers: ['model.layers.0-7']
w2:
  host: '127.0.0.1:10129'
  layers: ['model.layers.8-13']
"""  # blocks 14-15 stay on the master


def block_shapes(i: int) -> dict[str, tuple[int, ...]]:
    c = CONFIG
    hidden, inter, head_dim = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    prefix = f"model.layers.{i}."
    return {
        prefix + "input_layernorm.weight": (hidden,),
        prefix + "post_attention_layernorm.weight": (hidden,),
        prefix + "self_attn.q_proj.weight": (q, hidden),
        prefix + "self_attn.k_proj.weight": (kv, hidden),
        prefix + "self_attn.v_proj.weight": (kv, hidden),
        prefix + "self_attn.o_proj.weight": (hidden, q),
        prefix + "mlp.gate_proj.weight": (inter, hidden),
        prefix + "mlp.up_proj.weight": (inter, hidden),
        prefix + "mlp.down_proj.weight": (hidden, inter),
    }


def build_model(folder: Path) -> None:
    """Random bf16 weights, sharded with an index, as Hugging Face publishes them."""
    import torch
    from safetensors.torch import save_file

    n_layers = CONFIG["num_hidden_layers"]
    groups = [
        range(start, min(start + BLOCKS_PER_SHARD, n_layers))
        for start in range(0, n_layers, BLOCKS_PER_SHARD)
    ]
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    generator = torch.Generator().manual_seed(0)
    for n, blocks in enumerate(groups, 1):
        shapes = {name: shape for i in blocks for name, shape in block_shapes(i).items()}
        if n == 1:
            shapes["model.embed_tokens.weight"] = (CONFIG["vocab_size"], CONFIG["hidden_size"])
        if n == len(groups):
            shapes["model.norm.weight"] = (CONFIG["hidden_size"],)
        tensors = {
            name: torch.randn(shape, generator=generator, dtype=torch.bfloat16)
            for name, shape in shapes.items()
        }
        file = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(partial / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        print(f"  wrote {file}", file=sys.stderr)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (partial / "config.json").write_text(json.dumps(CONFIG, indent=2))
    os.replace(partial, folder)


def run_child(args: list[str]) -> tuple[int, float, float]:
    """(exit code, peak RSS in MiB, seconds) of one child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(args)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak_kib = usage.ru_maxrss  # KiB on Linux
    return proc.returncode, peak_kib / 1024, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="where the model and the bundles go")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    folder = options.folder
    model = folder / "model"
    if options.build_only:
        build_model(model)
        return
    if not (model / "model.safetensors.index.json").is_file():
        print(f"building a Llama-3.2-1B-shaped bf16 model in {model} ...", file=sys.stderr)
        code, _, _ = run_child([sys.executable, __file__, str(folder), "--build-only"])
        if code != 0:
            sys.exit(f"building the model failed (exit code {code})")
    topology = folder / "topology.yml"
    topology.write_text(TOPOLOGY)

    model_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    largest = CONFIG["vocab_size"] * CONFIG["hidden_size"] * 2  # the embedding, bf16
    code, baseline_mib, _ = run_child([sys.executable, "-c", "import cake.split"])
    assert code == 0, "importing cake.split failed"
    split = [
        sys.executable,
        "-c",
        "from cake.cli import split_main; split_main()",
        "--model-path",
        str(model),
        "--topology",
        str(topology),
        "--output",
        str(folder / "out"),
        "--force",
    ]
    code, peak_mib, seconds = run_child(split)
    if code != 0:
        sys.exit(f"the split failed (exit code {code})")
    sys.stderr.flush()
    print(f"model:            {model_bytes / 2**20:8.0f} MiB on disk ({model})")
    print(f"largest tensor:   {largest / 2**20:8.0f} MiB (model.embed_tokens.weight)")
    print(f"import baseline:  {baseline_mib:8.0f} MiB peak RSS (python -c 'import cake.split')")
    print(f"split peak RSS:   {peak_mib:8.0f} MiB ({seconds:.1f} s)")
    print(f"split - baseline: {peak_mib - baseline_mib:8.0f} MiB")


if __name__ == "__main__":
    main()
