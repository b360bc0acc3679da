"""The model's shape, read from a Hugging Face `config.json`. No torch here.

The fields every family shares are read here; what a family changes in the block (biases, extra
norms, sliding windows, experts, ...) is read by its reader in cake/model/families.py into the
option fields below, whose defaults are Llama's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

from cake.errors import ModelFolderError
from cake.model.families import FAMILIES, supported

# The rope types our RoPE implements: plain RoPE, Llama 3.1's frequency-dependent scaling,
# linear position interpolation (Gemma 3's global layers) and Phi-3's LongRoPE.
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "longrope")
ROPE_KEYS = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "linear": ("factor",),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    # The rope scaling's parameters (ROPE_KEYS[rope_type]; longrope adds attention_factor), or
    # None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # --- what a family changes (cake/model/families.py); the defaults are Llama's -------------
    family: str = "llama"  # the config's model_type
    rope_type: str = "llama3"  # of rope_scaling, when it is set
    rotary_dim: int | None = None  # rotate only the first dims of a head (Phi-4-mini)
    local_rope_theta: float | None = None  # sliding-window layers' own base (Gemma 3)
    attention_bias: bool = False  # q/k/v projections have biases (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before rotary (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # RMSNorm scales by (offset + w) (Gemma: 1)
    sandwich_norms: bool = False  # norms after attention and after the MLP too (Gemma 3)
    embedding_scale: float = 1.0  # embeddings multiplied by this (Gemma: sqrt(hidden))
    activation: str = "silu"  # the MLP's gate: silu, gelu_tanh or gelu
    attention_scale: float | None = None  # None: 1/sqrt(head_dim)
    sliding_window: int | None = None  # keys a query sees on a sliding-window layer
    layer_types: tuple[str, ...] = ()  # per block: full_attention or sliding_attention
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    fused_checkpoint: bool = False  # q|k|v and gate|up stored as one tensor each (Phi-3)
    # Mixture of experts: a router and n_experts MLPs in the blocks sparse_layers marks.
    n_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    normalize_expert_weights: bool = False  # renormalise the top-k routing weights to sum 1
    sparse_layers: tuple[bool, ...] = ()

    def is_sliding(self, block: int) -> bool:
        """Whether `block` attends within a sliding window."""
        return (
            self.sliding_window is not None
            and block < len(self.layer_types)
            and self.layer_types[block] == "sliding_attention"
        )

    def is_sparse(self, block: int) -> bool:
        """Whether `block`'s MLP is a router and experts."""
        return self.n_experts > 0 and block < len(self.sparse_layers) and self.sparse_layers[block]

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> LlamaConfig:
        if not isinstance(d, dict):
            raise ModelFolderError(f"{source}: not a JSON object, so not a model's config")
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        family = FAMILIES.get(model_type)
        if family is None or any(a != family[0] for a in archs):
            raise ModelFolderError(
                f"{source}: unsupported architecture (model_type={model_type!r}, "
                f"architectures={archs}); cake runs these families: {supported()}"
            )
        act = d.get("hidden_act", "silu")
        if model_type != "gemma3_text" and act != "silu":
            raise ModelFolderError(f"{source}: hidden_act={act!r} is not supported (need 'silu')")
        try:
            hidden = _size(d, "hidden_size")
            n_heads = _size(d, "num_attention_heads")
            options = family[1](d, source)
            rope = _rope_from_config(d, source, model_type)
            config = cls(
                hidden_size=hidden,
                intermediate_size=_size(d, "intermediate_size"),
                n_layers=_size(d, "num_hidden_layers"),
                n_heads=n_heads,
                n_kv_heads=_size(d, "num_key_value_heads", n_heads),
                head_dim=_size(d, "head_dim", hidden // n_heads),
                vocab_size=_size(d, "vocab_size"),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=_size(d, "max_position_embeddings", 2048),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", model_type == "gemma3_text")),
                eos_token_ids=_as_ids(d.get("eos_token_id")),
                bos_token_id=d.get("bos_token_id"),
                raw=dict(d),
                family=model_type,
                **rope,
                **options,
            )
        except KeyError as exc:
            raise ModelFolderError(f"{source}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ModelFolderError):
                raise
            raise ModelFolderError(f"{source}: invalid config ({exc})") from None
        if n_heads % config.n_kv_heads:
            raise ModelFolderError(
                f"{source}: num_attention_heads {n_heads} is not a multiple of "
                f"num_key_value_heads {config.n_kv_heads}"
            )
        if not (config.rms_norm_eps > 0 and config.rope_theta > 0):
            raise ModelFolderError(f"{source}: rms_norm_eps and rope_theta must be positive")
        if config.sliding_window is not None and config.sliding_window <= 0:
            raise ModelFolderError(f"{source}: sliding_window must be positive")
        if config.n_experts and not 0 < config.experts_per_token <= config.n_experts:
            raise ModelFolderError(
                f"{source}: num_experts_per_tok {config.experts_per_token} must be between 1 and "
                f"the number of experts ({config.n_experts})"
            )
        return config

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> LlamaConfig:
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise ModelFolderError(
                f"{folder}: no config.json; --model must be a Hugging Face model folder "
                "(config.json, tokenizer files, *.safetensors) or a .gguf file"
            )
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelFolderError(f"{path}: not valid JSON ({exc})") from None
        except OSError as exc:
            raise ModelFolderError(f"{path}: cannot read it ({exc.strerror or exc})") from None
        return cls.from_dict(data, source=path)


def _size(d: dict[str, Any], key: str, default: int | None = None) -> int:
    """A positive whole number from the config (a missing or null optional one: `default`)."""
    value = d.get(key) if default is not None else d[key]
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"{key} must be a whole number, got {value!r}")
    if value <= 0:
        raise ValueError(f"{key} must be positive, got {value!r}")
    return int(value)


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope_from_config(d: dict[str, Any], source: str, model_type: str) -> dict[str, Any]:
    """rope_theta, rope_type, rope_scaling, rotary_dim and local_rope_theta.

    transformers < 5 writes `rope_theta` + `rope_scaling`; transformers >= 5 writes one
    `rope_parameters` map (Gemma 3: one per layer type). Published checkpoints use both."""
    params = dict(d.get("rope_parameters") or {})
    local: float | None = None
    if "full_attention" in params:  # per layer type (transformers >= 5, Gemma 3)
        local = float(params.get("sliding_attention", {}).get("rope_theta", 10000.0))
        params = dict(params["full_attention"])
    elif model_type == "gemma3_text":
        local = float(d.get("rope_local_base_freq", 10000.0))
    scaling = dict(d.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    merged = {**params, **scaling}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type == "su":  # Phi-3's first name for LongRoPE
        rope_type = "longrope"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelFolderError(
            f"{source}: rope type {rope_type!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    rope: dict[str, Any] = {"rope_theta": theta, "local_rope_theta": local}
    partial = float(merged.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)))
    if partial != 1.0:
        head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
        rope["rotary_dim"] = int(head_dim * partial)
    if rope_type == "default":
        return rope
    if rope_type == "longrope":
        merged.setdefault(
            "original_max_position_embeddings", d.get("original_max_position_embeddings")
        )
    keys = ROPE_KEYS[rope_type]
    missing = [k for k in keys if merged.get(k) is None]
    if missing:
        raise ModelFolderError(f"{source}: {rope_type} rope scaling lacks {', '.join(missing)}")
    if rope_type == "longrope":
        longrope = {
            "short_factor": tuple(float(v) for v in merged["short_factor"]),
            "long_factor": tuple(float(v) for v in merged["long_factor"]),
            "original_max_position_embeddings": float(merged["original_max_position_embeddings"]),
        }
        if merged.get("attention_factor") is not None:
            longrope["attention_factor"] = float(merged["attention_factor"])
        return {**rope, "rope_type": rope_type, "rope_scaling": longrope}
    return {**rope, "rope_type": rope_type, "rope_scaling": {k: float(merged[k]) for k in keys}}


def architecture_of(config: LlamaConfig) -> dict[str, Any]:
    """The config in one canonical spelling (whatever transformers version wrote config.json),
    for `protocol.fingerprint_config`: master and workers agree iff the architecture agrees.
    A Llama model's options are all defaults and left out, so its fingerprint is unchanged."""
    options = {
        f.name: getattr(config, f.name)
        for f in fields(config)
        if f.name in _FAMILY_OPTIONS and getattr(config, f.name) != f.default
    }
    return {
        "model_type": config.family,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "tie_word_embeddings": config.tie_word_embeddings,
        "cake_family_options": options or None,
    }


_FAMILY_OPTIONS = {f.name for f in fields(LlamaConfig)} - {
    "hidden_size", "intermediate_size", "n_layers", "n_heads", "n_kv_heads", "head_dim",
    "vocab_size", "rms_norm_eps", "rope_theta", "max_position_embeddings",
    "tie_word_embeddings", "rope_scaling", "eos_token_ids", "bos_token_id", "raw", "family",
}  # fmt: skip
