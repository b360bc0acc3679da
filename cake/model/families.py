"""What each model family changes in the one transformer block (cake/model/llama.py).

A family is a reading of a Hugging Face `config.json` into the options of `LlamaConfig`: the
block is always attention then MLP with residuals, and a family only switches parts of it on
(q/k/v biases, per-head q/k norms, norms after attention and MLP, sliding-window layers, a
router and experts instead of one MLP, ...). Adding a family is a reader here and, if its
tensors are named differently, an entry in cake/model/layout.py; nothing outside the model
package knows families exist.

Each reader takes the config dict and returns the family's option values (LlamaConfig field
name -> value); `FAMILIES` maps `model_type` to (architecture class name, reader).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from cake.errors import ModelFolderError

FULL, SLIDING = "full_attention", "sliding_attention"


def _llama(d: dict[str, Any], source: str) -> dict[str, Any]:
    for flag in ("attention_bias", "mlp_bias"):
        if d.get(flag):
            raise ModelFolderError(f"{source}: {flag}=true is not supported by cake")
    return {}


def _mistral(d: dict[str, Any], source: str) -> dict[str, Any]:
    window = d.get("sliding_window")
    return {"sliding_window": window, "layer_types": _all(d, SLIDING if window else FULL)}


def _qwen2(d: dict[str, Any], source: str) -> dict[str, Any]:
    """Qwen2/2.5: q/k/v biases; sliding-window layers only where `use_sliding_window` says
    (from `max_window_layers` on), which no released Qwen2.5 sets."""
    return {"attention_bias": True, **_qwen_windows(d)}


def _qwen3(d: dict[str, Any], source: str) -> dict[str, Any]:
    """Qwen3: per-head RMSNorm of q and k before rotary; no biases (unless configured)."""
    return {"attention_bias": bool(d.get("attention_bias")), "qk_norm": True, **_qwen_windows(d)}


def _qwen3_moe(d: dict[str, Any], source: str) -> dict[str, Any]:
    """Qwen3-MoE: Qwen3's attention, and experts in every `decoder_sparse_step`-th block but
    those in `mlp_only_layers` (softmax over all experts, top-k, renormalised if
    `norm_topk_prob`)."""
    n_layers = int(d["num_hidden_layers"])
    step = int(d.get("decoder_sparse_step") or 1)
    dense = set(d.get("mlp_only_layers") or ())
    sparse = tuple(i not in dense and (i + 1) % step == 0 for i in range(n_layers))
    experts = d.get("num_experts", d.get("num_local_experts"))
    return {
        **_qwen3(d, source),
        "n_experts": _positive(experts, "num_experts", source),
        "experts_per_token": _positive(d.get("num_experts_per_tok"), "num_experts_per_tok", source),
        "expert_intermediate_size": _positive(
            d.get("moe_intermediate_size"), "moe_intermediate_size", source
        ),
        "normalize_expert_weights": bool(d.get("norm_topk_prob", False)),
        "sparse_layers": sparse,
    }


def _mixtral(d: dict[str, Any], source: str) -> dict[str, Any]:
    """Mixtral: Mistral's attention, experts in every block (top-k renormalised)."""
    n_layers = int(d["num_hidden_layers"])
    return {
        **_mistral(d, source),
        "n_experts": _positive(d.get("num_local_experts"), "num_local_experts", source),
        "experts_per_token": _positive(d.get("num_experts_per_tok"), "num_experts_per_tok", source),
        "expert_intermediate_size": _positive(
            d.get("intermediate_size"), "intermediate_size", source
        ),
        "normalize_expert_weights": True,
        "sparse_layers": (True,) * n_layers,
    }


def _phi3(d: dict[str, Any], source: str) -> dict[str, Any]:
    """Phi-3/Phi-4: q|k|v and gate|up stored fused; LongRoPE and partial rotary in the rope
    reader; a sliding window on every layer where configured (Phi-3-mini-4k)."""
    return {**_mistral(d, source), "fused_checkpoint": True}


def _gemma3(d: dict[str, Any], source: str) -> dict[str, Any]:
    """Gemma 3 (text): embeddings scaled by sqrt(hidden), RMSNorm by (1 + w), norms before and
    after both attention and MLP, per-head q/k norms, GELU (tanh), attention scaled by
    query_pre_attn_scalar, sliding-window layers interleaved with global ones (their rotary
    has its own base), the final logits soft-capped where configured. Gemma 3's references
    (transformers, llama.cpp) do not apply `attn_logit_softcapping` (Gemma 2's), and its
    published configs leave it null: neither does cake."""
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu"):
        raise ModelFolderError(f"{source}: hidden_activation={act!r} is not supported for gemma3")
    types = d.get("layer_types")
    if not types:
        pattern = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
        types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(d["num_hidden_layers"])]
    scalar = d.get("query_pre_attn_scalar")
    return {
        "embedding_scale": math.sqrt(d["hidden_size"]),
        "norm_offset": 1.0,
        "sandwich_norms": True,
        "qk_norm": True,
        "activation": "gelu_tanh" if act == "gelu_pytorch_tanh" else "gelu",
        "attention_scale": float(scalar) ** -0.5 if scalar else None,
        "sliding_window": d.get("sliding_window"),
        "layer_types": tuple(types),
        "final_softcap": d.get("final_logit_softcapping"),
        "attention_bias": bool(d.get("attention_bias")),
    }


def _qwen_windows(d: dict[str, Any]) -> dict[str, Any]:
    types = d.get("layer_types")
    if not types:
        first = int(d.get("max_window_layers") or 0)
        windowed = bool(d.get("use_sliding_window")) and d.get("sliding_window")
        types = [
            SLIDING if windowed and i >= first else FULL for i in range(d["num_hidden_layers"])
        ]
    window = d.get("sliding_window") if SLIDING in types else None
    return {"sliding_window": window, "layer_types": tuple(types)}


def _all(d: dict[str, Any], kind: str) -> tuple[str, ...]:
    return (kind,) * int(d["num_hidden_layers"])


def _positive(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelFolderError(f"{source}: {key} must be a positive whole number, got {value!r}")
    return value


Reader = Callable[[dict[str, Any], str], dict[str, Any]]

# model_type -> (the transformers class a checkpoint of it names, its reader)
FAMILIES: dict[str, tuple[str, Reader]] = {
    "llama": ("LlamaForCausalLM", _llama),
    "mistral": ("MistralForCausalLM", _mistral),
    "qwen2": ("Qwen2ForCausalLM", _qwen2),
    "qwen3": ("Qwen3ForCausalLM", _qwen3),
    "qwen3_moe": ("Qwen3MoeForCausalLM", _qwen3_moe),
    "mixtral": ("MixtralForCausalLM", _mixtral),
    "phi3": ("Phi3ForCausalLM", _phi3),
    "gemma3_text": ("Gemma3ForCausalLM", _gemma3),
}

# Activation names a family's MLP may use (config `hidden_act`).
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def supported() -> str:
    return ", ".join(f"{name} ({cls})" for name, (cls, _) in FAMILIES.items())
