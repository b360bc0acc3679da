"""A GGUF file's metadata as the Hugging Face config.json cake reads (cake/model/config.py).

llama.cpp's converter (convert_hf_to_gguf.py) writes the config as `{arch}.<key>` metadata, the
same keys for every architecture (FIELDS). What it leaves out, llama.cpp's loader fixes for each
architecture, and so does this reading (ARCHITECTURES):

- `llama`: Mixtral where it has experts (`expert_count`; top-k weights renormalised), Mistral
  where it has a sliding window, else Llama. The converter writes no window for Mistral (v0.1's
  4096 is dropped: llama.cpp runs it without one), so a Mistral GGUF reads as Llama, which is the
  same model then.
- `qwen2`, `qwen3`: no sliding windows (llama.cpp runs none); q/k/v biases where the file has them.
- `qwen3moe`: experts in every block (llama.cpp has no dense blocks here, nor does its converter
  write them), top-k weights renormalised (llama.cpp does, whatever the model's norm_topk_prob);
  expert width `expert_feed_forward_length`, else feed_forward_length / expert_used_count.
- `phi3`: partial rotary from rope.dimension_count; a sliding window of 0 means none (Phi-4).
- `gemma3`: one global layer every 6 (llama.cpp's fixed pattern) when a window is set, the local
  layers' rotary base 10000 (or `rope.freq_base_swa`), queries scaled by 1/sqrt(head_dim) but for
  the 62-block 27B (1/sqrt(hidden / heads)), final soft-capping where the file sets it.

Rotary scaling: `rope.scaling.type` linear (with its factor); LongRoPE's factors are tensors
(`rope_factors_long`/`_short`, Phi-3); Llama 3's scaling is a tensor too (`rope_freqs`: a divisor
per frequency, which the converter computes from factor, low/high_freq_factor and the original
context). Those divisors are LongRoPE's form, one set for every context, so they are written as
longrope with short = long factors and attention factor 1: the same frequencies llama.cpp uses.
YaRN is refused (cake's rotary has no YaRN). The tied head: no `output` tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cake.errors import ModelFolderError
from cake.model.families import FAMILIES, FULL, SLIDING
from cake.model.gguf.header import GGUFHeader
from cake.model.gguf.names import check_architecture

# {arch}.<key> -> config.json field (llama.cpp's LLM_KV names; gguf.Keys.LLM/Attention/Rope).
FIELDS = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "context_length": "max_position_embeddings",
    "rope.freq_base": "rope_theta",
    "attention.sliding_window": "sliding_window",
    "expert_count": "num_experts",
    "expert_used_count": "num_experts_per_tok",
    "expert_feed_forward_length": "moe_intermediate_size",
    "final_logit_softcapping": "final_logit_softcapping",
}
REQUIRED = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
# tokenizer.ggml.<key> -> config.json field; end-of-turn and end-of-message ids end a reply too.
TOKEN_IDS = {"bos_token_id": "bos_token_id", "padding_token_id": "pad_token_id"}
END_IDS = ("eos_token_id", "eot_token_id", "eom_token_id")


def config_from_gguf(header: GGUFHeader) -> dict[str, Any]:
    """config.json's fields for the model in this file (LlamaConfig.from_dict checks them)."""
    arch = check_architecture(header)
    missing = [f"{arch}.{key}" for key in REQUIRED if header.arch_value(key) is None]
    if "token_embd.weight" not in header.tensors:
        missing.append("the tensor token_embd.weight")
    if missing:
        raise ModelFolderError(
            f"{header.path}: no {', '.join(missing)}; llama.cpp's converter writes these for "
            "every model, so this file is incomplete or was not written for llama.cpp"
        )
    config: dict[str, Any] = {
        field: _one(header, key)
        for key, field in FIELDS.items()
        if header.arch_value(key) is not None
    }
    config["vocab_size"] = header.tensors["token_embd.weight"].shape[0]
    config["tie_word_embeddings"] = "output.weight" not in header.tensors
    for key, field in TOKEN_IDS.items():
        config[field] = header.metadata.get(f"tokenizer.ggml.{key}")
    ends = [header.metadata.get(f"tokenizer.ggml.{key}") for key in END_IDS]
    ends = list(dict.fromkeys(e for e in ends if e is not None))
    config["eos_token_id"] = ends[0] if len(ends) == 1 else ends or None
    model_type = ARCHITECTURES[arch](header, config)
    config.update(_rope(header, config))
    config["model_type"] = model_type
    config["architectures"] = [FAMILIES[model_type][0]]
    return config


def _llama(header: GGUFHeader, c: dict[str, Any]) -> str:
    if c.get("num_experts"):
        c["num_local_experts"] = c.pop("num_experts")
        return "mixtral"
    return "mistral" if c.get("sliding_window") else "llama"


def _qwen2(header: GGUFHeader, c: dict[str, Any]) -> str:
    c["use_sliding_window"] = False
    return "qwen2"


def _qwen3(header: GGUFHeader, c: dict[str, Any]) -> str:
    c["use_sliding_window"] = False
    c["attention_bias"] = any(name.endswith("attn_q.bias") for name in header.tensors)
    return "qwen3"


def _qwen3moe(header: GGUFHeader, c: dict[str, Any]) -> str:
    _qwen3(header, c)
    used = c.get("num_experts_per_tok") or 0
    if not c.get("moe_intermediate_size") and used:
        c["moe_intermediate_size"] = c["intermediate_size"] // used
    c["norm_topk_prob"] = True
    c["decoder_sparse_step"] = 1
    c["mlp_only_layers"] = [
        i
        for i in range(c["num_hidden_layers"])
        if f"blk.{i}.ffn_gate_inp.weight" not in header.tensors
    ]
    return "qwen3_moe"


def _phi3(header: GGUFHeader, c: dict[str, Any]) -> str:
    c["sliding_window"] = c.get("sliding_window") or None
    return "phi3"


def _gemma3(header: GGUFHeader, c: dict[str, Any]) -> str:
    n_layers, window = c["num_hidden_layers"], c.get("sliding_window") or None
    c["sliding_window"] = window
    c["layer_types"] = [
        FULL if not window or (i + 1) % 6 == 0 else SLIDING for i in range(n_layers)
    ]
    c["rope_local_base_freq"] = float(header.arch_value("rope.freq_base_swa", 10000.0))
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    c["head_dim"] = head_dim
    c["query_pre_attn_scalar"] = (
        c["hidden_size"] // c["num_attention_heads"] if n_layers == 62 else head_dim
    )
    c["hidden_activation"] = "gelu_pytorch_tanh"
    c.setdefault("final_logit_softcapping", None)
    return "gemma3_text"


# general.architecture -> its reader: the model_type, and the fields llama.cpp implies.
ARCHITECTURES: dict[str, Callable[[GGUFHeader, dict[str, Any]], str]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "qwen3moe": _qwen3moe,
    "phi3": _phi3,
    "gemma3": _gemma3,
}


def _rope(header: GGUFHeader, c: dict[str, Any]) -> dict[str, Any]:
    """rope_scaling (and partial_rotary_factor) from the rope keys and factor tensors."""
    out: dict[str, Any] = {}
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    rotary = header.arch_value("rope.dimension_count")
    if rotary and rotary != head_dim:
        out["partial_rotary_factor"] = rotary / head_dim
    kind = header.arch_value("rope.scaling.type", "none")
    factor = header.arch_value("rope.scaling.factor", header.arch_value("rope.scale_linear"))
    context = c.get("max_position_embeddings")
    if "rope_factors_long.weight" in header.tensors:
        original = header.arch_value("rope.scaling.original_context_length", context)
        out["original_max_position_embeddings"] = original
        out["rope_scaling"] = {
            "rope_type": "longrope",
            "long_factor": header.read_floats("rope_factors_long.weight").tolist(),
            "short_factor": header.read_floats("rope_factors_short.weight").tolist(),
            "attention_factor": float(header.arch_value("rope.scaling.attn_factor", 1.0)),
        }
    elif "rope_freqs.weight" in header.tensors:
        divisors = header.read_floats("rope_freqs.weight").tolist()
        out["rope_scaling"] = {
            "rope_type": "longrope",
            "long_factor": divisors,
            "short_factor": divisors,
            "attention_factor": 1.0,
            "original_max_position_embeddings": context,
        }
    elif kind == "yarn":
        raise ModelFolderError(
            f"{header.path}: YaRN rotary scaling ({header.architecture}.rope.scaling.type = "
            "yarn) is not supported by cake (supported: none, linear, Llama 3's and LongRoPE's "
            "factors)"
        )
    elif kind in ("linear", "none"):
        if factor not in (None, 1.0):
            out["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    else:
        raise ModelFolderError(
            f"{header.path}: rotary scaling {kind!r} is not supported by cake (supported: none, "
            "linear, Llama 3's and LongRoPE's factors)"
        )
    return out


def _one(header: GGUFHeader, key: str) -> Any:
    """A key's value; a per-block array (llama.cpp allows one) must hold one value throughout."""
    value = header.arch_value(key)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ModelFolderError(
                f"{header.path}: {header.architecture}.{key} differs between blocks ({value}); "
                "cake runs models whose blocks are all alike"
            )
        value = value[0]
    return value
