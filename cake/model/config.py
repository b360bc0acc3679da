"""The model's shape, read from a Hugging Face `config.json`. No torch here."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from cake.errors import ModelFolderError

# The rope types our RoPE implements: plain RoPE and Llama 3.1's frequency-dependent scaling.
SUPPORTED_ROPE_TYPES = ("default", "llama3")


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
    # llama3 rope scaling parameters (factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings), or None for plain RoPE.
    rope_scaling: dict[str, float] | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> LlamaConfig:
        if not isinstance(d, dict):
            raise ModelFolderError(f"{source}: not a JSON object, so not a model's config")
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type != "llama" or any(a != "LlamaForCausalLM" for a in archs):
            raise ModelFolderError(
                f"{source}: unsupported architecture (model_type={model_type!r}, "
                f"architectures={archs}); cake runs Llama-family models only "
                "(model_type 'llama', LlamaForCausalLM)"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise ModelFolderError(f"{source}: {flag}=true is not supported by cake")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ModelFolderError(f"{source}: hidden_act={act!r} is not supported (need 'silu')")
        try:
            hidden = _size(d, "hidden_size")
            n_heads = _size(d, "num_attention_heads")
            rope_theta, rope_scaling = _rope_from_config(d, source)
            config = cls(
                hidden_size=hidden,
                intermediate_size=_size(d, "intermediate_size"),
                n_layers=_size(d, "num_hidden_layers"),
                n_heads=n_heads,
                n_kv_heads=_size(d, "num_key_value_heads", n_heads),
                head_dim=_size(d, "head_dim", hidden // n_heads),
                vocab_size=_size(d, "vocab_size"),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                max_position_embeddings=_size(d, "max_position_embeddings", 2048),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                rope_scaling=rope_scaling,
                eos_token_ids=_as_ids(d.get("eos_token_id")),
                bos_token_id=d.get("bos_token_id"),
                raw=dict(d),
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


def _rope_from_config(d: dict[str, Any], source: str) -> tuple[float, dict[str, float] | None]:
    # transformers < 5 writes `rope_theta` + `rope_scaling`; transformers >= 5 writes one
    # `rope_parameters` map. Published checkpoints use both, so read both.
    params = dict(d.get("rope_parameters") or {})
    scaling = dict(d.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    merged = {**params, **scaling}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelFolderError(
            f"{source}: rope type {rope_type!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return theta, None
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in merged]
    if missing:
        raise ModelFolderError(f"{source}: llama3 rope scaling lacks {', '.join(missing)}")
    return theta, {k: float(merged[k]) for k in keys}


def architecture_of(config: LlamaConfig) -> dict[str, Any]:
    """The config in one canonical spelling (whatever transformers version wrote config.json),
    for `protocol.fingerprint_config`: master and workers agree iff the architecture agrees."""
    return {
        "model_type": "llama",
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
    }
