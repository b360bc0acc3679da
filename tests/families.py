"""Random checkpoints of every model family cake runs, for parity tests against transformers.

Each config is a published model's `config.json` fields (named in FAMILIES) with its sizes
shrunk: the options that change the math (biases, norms, windows, rope scaling, partial rotary,
experts, soft-capping) are kept as published, or set where the published model leaves them off
but the family supports them (noted), so every code path runs. Windows are shrunk below the
test prompts' length so that sliding-window layers really slide.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from helpers import LLAMA3_EOS_IDS, LLAMA3_VOCAB_SIZE, llama3_tokenizer_path

SMALL = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}

# model_type -> config fields beyond SMALL (the published model each follows in the comment)
FAMILIES: dict[str, dict[str, Any]] = {
    # Mistral-7B-v0.1: a sliding window on every layer (4096 there)
    "mistral": {
        "model_type": "mistral",
        "architectures": ["MistralForCausalLM"],
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "sliding_window": 24,
        "tie_word_embeddings": False,
    },
    # Qwen2.5-0.5B-Instruct: q/k/v biases, tied embeddings, rope 1e6, windows off
    "qwen2": {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 21,
    },
    # Qwen3-0.6B: per-head q/k norms, head_dim apart from hidden/heads (128 there), tied
    "qwen3": {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "head_dim": 32,
        "attention_bias": False,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": 28,
    },
    # gemma-3-4b's text model: sandwich norms, q/k norms, (1 + w) norms, scaled embeddings,
    # GELU, query_pre_attn_scalar, 5 sliding layers to 1 global (2 to 1 here), local rope base
    # 10000, linear rope scaling 8 on global layers; final soft-capping is off in Gemma 3 as
    # published, set here (Gemma 2's value) so that its path is tested too.
    "gemma3_text": {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "head_dim": 32,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 32,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "sliding_window": 24,
        "sliding_window_pattern": 3,
        "layer_types": [
            "sliding_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention",
        ],
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": None,
        "tie_word_embeddings": True,
    },
    # Phi-4-mini-instruct: fused qkv_proj and gate_up_proj, partial rotary 0.75, LongRoPE
    # (factors per rotary frequency), tied embeddings
    "phi3": {
        "model_type": "phi3",
        "architectures": ["Phi3ForCausalLM"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.75,
        "original_max_position_embeddings": 128,
        "rope_scaling": {
            "type": "longrope",
            "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 3.0],
            "long_factor": [1.0, 1.5, 2.5, 4.0, 8.0, 16.0],
        },
        "sliding_window": 262144,
        "tie_word_embeddings": True,
    },
    # Qwen3-30B-A3B: 128 experts, 8 per token, normalised top-k, experts in every block
    # (one block kept dense here through mlp_only_layers, which the family supports)
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "head_dim": 16,
        "attention_bias": False,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "num_experts": 8,
        "num_experts_per_tok": 3,
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "sliding_window": None,
    },
    # Mixtral-8x7B: 8 experts, 2 per token, renormalised
    "mixtral": {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "sliding_window": None,
        "tie_word_embeddings": False,
    },
}


def family_config(family: str, vocab: int = LLAMA3_VOCAB_SIZE) -> dict[str, Any]:
    return {
        **SMALL,
        **FAMILIES[family],
        "vocab_size": vocab,
        "bos_token_id": 128000,
        "eos_token_id": list(LLAMA3_EOS_IDS),
        "pad_token_id": None,
        "initializer_range": 0.1,
    }


def reference_model(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def build_family(
    folder: Path,
    family: str,
    seed: int = 0,
    shard: bool = False,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """A random checkpoint of `family` in `folder`, with the real Llama 3.2 tokenizer files (the
    vocabulary is sized to it unless `overrides` sets vocab_size), written by transformers
    itself. `overrides`: config fields set over the family's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    data = {**family_config(family), **(overrides or {})}
    (folder / "config.json").write_text(json.dumps(data))
    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # random, so a dropped or misplaced norm shows
                param.uniform_(-0.5, 0.5) if family == "gemma3_text" else param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0, 0.1)
    model.generation_config.eos_token_id = list(LLAMA3_EOS_IDS)
    kwargs: dict[str, Any] = {}
    if shard:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        kwargs["max_shard_size"] = max(total // 5, 1)
    model.save_pretrained(folder, **kwargs)
    for path in llama3_tokenizer_path().iterdir():
        if path.is_file():
            shutil.copy(path, folder / path.name)
    return folder
