"""GGUF files written from a Hugging Face checkpoint the way llama.cpp's convert_hf_to_gguf.py
writes them, for tests of cake's GGUF reading (test_gguf_families.py).

Independent of cake's reader: tensor names come from gguf-py's tensor map (the one the converter
maps names with), metadata keys from gguf-py's writer methods, and the conventions from the
converter's model classes:
- `llama` (Llama, Mistral, Mixtral): q/k rows permuted for llama.cpp's RoPE; Llama 3's rotary
  scaling as the `rope_freqs` tensor (a divisor per frequency); Mixtral's experts stacked into
  3-D `ffn_*_exps` tensors; no sliding window written.
- `qwen2`, `qwen3`, `qwen3moe`: names mapped as they are (Qwen-MoE experts stacked too); the
  MoE's expert width as `expert_feed_forward_length`.
- `phi3`: its own keys (rotary dimensions, original context, LongRoPE's attention factor) and
  LongRoPE's factors as the `rope_factors_long`/`_short` tensors; a window of 0 for none.
- `gemma3`: every `*norm.weight` stored as 1 + w; the local rotary base as `rope.freq_base_swa`;
  final soft-capping written where set.
A tied head has no `output` tensor. 2-D weights (and the 3-D experts) are stored in `qtype`,
everything else (norms, biases, the router, rope factors) in F32, as the converter does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import (
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    GGUFWriter,
    RopeScalingType,
    SpecialVocab,
    TokenType,
    get_tensor_name_map,
)
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file

# Hugging Face model_type -> the architecture the converter writes it as
ARCHITECTURES = {
    "llama": MODEL_ARCH.LLAMA,
    "mistral": MODEL_ARCH.LLAMA,
    "mixtral": MODEL_ARCH.LLAMA,
    "qwen2": MODEL_ARCH.QWEN2,
    "qwen3": MODEL_ARCH.QWEN3,
    "qwen3_moe": MODEL_ARCH.QWEN3MOE,
    "phi3": MODEL_ARCH.PHI3,
    "gemma3_text": MODEL_ARCH.GEMMA3,
}
_EXPERT = (  # (Hugging Face name of one expert's weight, its name in the stacked tensor)
    (r"block_sparse_moe.experts.{e}.{w}", "block_sparse_moe.experts.{w}"),
    (r"mlp.experts.{e}.{w}", "mlp.experts.{w}"),
)


def write_gguf(
    folder: Path, path: Path, qtype: str = "F32", tokenizer: Path | None = None
) -> dict[str, torch.Tensor]:
    """Write the checkpoint in `folder` as a GGUF file at `path`, its weights in `qtype` (F32,
    Q8_0, Q4_0), with the tokenizer of the folder `tokenizer` (a tokenizer.json) if given.

    Returns the checkpoint as the file holds it, under the Hugging Face names: each quantized
    weight dequantized by gguf (quantization is per row, so it commutes with the converter's row
    permutations and expert stacking)."""
    config = json.loads((folder / "config.json").read_text())
    arch = ARCHITECTURES[config["model_type"]]
    tensors = load_file(str(folder / "model.safetensors"))
    writer = GGUFWriter(str(path), MODEL_ARCH_NAMES[arch])
    _metadata(writer, config)
    names = get_tensor_name_map(arch, config["num_hidden_layers"])
    kind = GGMLQuantizationType[qtype]
    held: dict[str, torch.Tensor] = {}
    for hf_name, values in _converted(config, tensors):
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = base if base.startswith("rope_") else names.get_name(base)
        assert gguf_name is not None, f"gguf-py maps no name for {hf_name}"
        quantized = kind != GGMLQuantizationType.F32 and values.ndim >= 2
        quantized = quantized and not gguf_name.endswith(("_norm", "ffn_gate_inp"))
        data = values.numpy().astype(np.float32)
        if quantized:
            data = quantize(data, kind)
        writer.add_tensor(f"{gguf_name}.{suffix}", data, raw_dtype=kind if quantized else None)
    for hf_name, values in tensors.items():  # as the file holds them, in Hugging Face's layout
        held[hf_name] = values
        keep = kind == GGMLQuantizationType.F32 or values.ndim < 2
        if not (keep or hf_name.endswith(("norm.weight", "mlp.gate.weight", "moe.gate.weight"))):
            q = dequantize(quantize(values.numpy().astype(np.float32), kind), kind)
            held[hf_name] = torch.from_numpy(q.copy()).reshape(values.shape)
    if tokenizer is not None:
        _tokenizer(writer, tokenizer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def _converted(config: dict[str, Any], tensors: dict[str, torch.Tensor]):
    """(Hugging Face name, values) as the converter hands them to the name map."""
    model_type = config["model_type"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    experts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, values in tensors.items():
        if ARCHITECTURES[model_type] == MODEL_ARCH.LLAMA:
            if name.endswith("q_proj.weight"):
                values = _permute(values, heads)
            elif name.endswith("k_proj.weight"):
                values = _permute(values, kv_heads)
        if model_type == "gemma3_text" and name.endswith("norm.weight"):
            values = values + 1
        stacked = _stacked_name(name)
        if stacked is None:
            yield name, values
            continue
        stacked_name, expert = stacked
        experts.setdefault(stacked_name, []).append((expert, values))
    for name, parts in experts.items():
        yield name, torch.stack([values for _, values in sorted(parts, key=lambda p: p[0])])
    yield from _rope_tensors(config)


def _stacked_name(name: str) -> tuple[str, int] | None:
    parts = name.split(".")
    if "experts" not in parts:
        return None
    at = parts.index("experts")
    expert = int(parts[at + 1])
    return ".".join(parts[: at + 1] + parts[at + 2 :]), expert


def _permute(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """The converter's LlamaModel.permute: each head's rows from rotate-half pairs (i, i + d/2)
    to interleaved pairs (2i, 2i + 1)."""
    rows = weights.shape[0]
    pairs = weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])  # (h, 2, d/2, in)
    return pairs.swapaxes(1, 2).reshape(weights.shape)


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    """The global layers' rope parameters, whichever way transformers wrote config.json."""
    params = dict(config.get("rope_parameters") or {})
    params = dict(params.get("full_attention", params))
    params.update(config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _rope_tensors(config: dict[str, Any]):
    rope = _rope(config)
    head_dim = _head_dim(config)
    # LlamaModel.generate_extra_tensors. It reads the original context from the config's top
    # level (8192 if absent, as in Llama 3.x's published configs, whose rope_scaling says 8192
    # too); the one the model states is taken here, so that the test model's smaller one holds.
    if rope["rope_type"] == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
        factors = []
        for freq in freqs.tolist():
            wavelen = 2 * math.pi / freq
            if wavelen < old / high:
                factors.append(1.0)
            elif wavelen > old / low:
                factors.append(factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        yield "rope_freqs.weight", torch.tensor(factors, dtype=torch.float32)
    if rope["rope_type"] == "longrope":  # Phi3MiniModel.generate_extra_tensors
        yield "rope_factors_long.weight", torch.tensor(rope["long_factor"], dtype=torch.float32)
        yield "rope_factors_short.weight", torch.tensor(rope["short_factor"], dtype=torch.float32)


def _head_dim(c: dict[str, Any]) -> int:
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def _metadata(writer: GGUFWriter, c: dict[str, Any]) -> None:
    """The converter's set_gguf_parameters: TextModel's, then each model class's own."""
    model_type, rope = c["model_type"], _rope(c)
    if model_type == "phi3":
        _phi3_metadata(writer, c, rope)
        return
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(c["num_attention_heads"])
    writer.add_head_count_kv(c["num_key_value_heads"])
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_rope_freq_base(rope["rope_theta"])
    local = (c.get("rope_parameters") or {}).get("sliding_attention", {}).get("rope_theta")
    if local is not None:
        writer.add_rope_freq_base_swa(local)
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    experts = c.get("num_local_experts", c.get("num_experts"))
    if experts is not None:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(c["num_experts_per_tok"])
    if c.get("head_dim") is not None:
        writer.add_key_length(c["head_dim"])
        writer.add_value_length(c["head_dim"])
    if ARCHITECTURES[model_type] == MODEL_ARCH.LLAMA:  # LlamaModel
        writer.add_vocab_size(c["vocab_size"])
        writer.add_rope_dimension_count(_head_dim(c))
    if model_type == "qwen3_moe":  # Qwen2MoeModel
        writer.add_expert_feed_forward_length(c["moe_intermediate_size"])
    if model_type == "gemma3_text":  # Gemma3Model
        if c.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(c["final_logit_softcapping"])
        writer.add_sliding_window(c["sliding_window"])


def _phi3_metadata(writer: GGUFWriter, c: dict[str, Any], rope: dict[str, Any]) -> None:
    """Phi3MiniModel.set_gguf_parameters and its LongRoPE attention factor."""
    heads, context = c["num_attention_heads"], c["max_position_embeddings"]
    original = c.get("original_max_position_embeddings") or rope["original_max_position_embeddings"]
    writer.add_context_length(context)
    writer.add_rope_scaling_orig_ctx_len(original)
    writer.add_embedding_length(c["hidden_size"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(c["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    partial = c.get("partial_rotary_factor") or rope.get("partial_rotary_factor", 1.0)
    writer.add_rope_dimension_count(int(partial * c["hidden_size"]) // heads)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_sliding_window(c.get("sliding_window") or 0)
    if rope["rope_type"] == "longrope":
        scale = context / original
        factor = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
        writer.add_rope_scaling_attn_factors(factor)


def _tokenizer(writer: GGUFWriter, folder: Path) -> None:
    """A byte-level BPE tokenizer as the converter's _set_vocab_gpt2 writes it."""
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    by_id = {i: token for token, i in data["model"]["vocab"].items()}
    added = {t["id"]: t for t in data["added_tokens"]}
    by_id.update({i: t["content"] for i, t in added.items()})
    tokens, types = [], []
    for i in range(max(by_id) + 1):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        if i not in by_id:
            types.append(TokenType.UNUSED)
        elif i in added:
            types.append(TokenType.CONTROL if added[i]["special"] else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    SpecialVocab(folder, load_merges=True).add_to_gguf(writer, quiet=True)
