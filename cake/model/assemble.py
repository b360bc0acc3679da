"""One block of any family, built from its checkpoint tensors (cake/model/layout.py names them).

The loader reads real tensors (or maps packed ones from cake/model/weight_cache), `random_part`
makes random ones of the same shapes; both hand this module functions that return, by checkpoint
names, finished projections and float tensors, so a block is put together in one place:
projections fused and quantized (cake/model/linear.py), norms with the family's offset, biases,
per-head q/k norms, and for a mixture-of-experts block its router and experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cake.model.config import LlamaConfig
from cake.model.layout import (
    attention_biases,
    attention_projections,
    block_norms,
    expert_projections,
    head_norms,
    mlp_projections,
    router,
)
from cake.model.llama import MLP, Attention, Block, Projection, RMSNorm, SparseMoE
from cake.model.quant import QuantizedTensor, Weight

# names of the weights one projection fuses (q|k|v, gate|up, ...) -> the finished module
# (read and packed by cake/model/linear.py, or mapped from the packed-weight cache);
Projector = Callable[[list[str]], nn.Module]
# names -> float tensors in the run dtype on the run device (norms, biases, the router).
Floats = Callable[[list[str]], list[torch.Tensor]]


def build_block(
    config: LlamaConfig,
    block: int,
    projection: Projector,
    floats: Floats,
) -> Block:
    """`projection`: the names of the weights fused along the output -> the finished module."""
    names = attention_projections(config, block)
    biases = attention_biases(config, block)
    q_norm = k_norm = None
    if config.qk_norm:
        per_head = head_norms(config, block)
        q_norm, k_norm = (norm(config, w) for w in floats([per_head["q"], per_head["k"]]))
    attention = Attention(
        config,
        block,
        projection(names["qkv"]),
        projection(names["out"]),
        torch.cat(floats(biases)) if biases else None,
        q_norm,
        k_norm,
    )
    mlp: nn.Module
    if config.is_sparse(block):
        experts = [
            _mlp(
                expert_projections(config, block, e),
                config.expert_intermediate_size,
                config,
                projection,
            )
            for e in range(config.n_experts)
        ]
        (router_weight,) = floats([router(config, block)])
        mlp = SparseMoE(config, Projection([router_weight]), experts)
    else:
        mlp = _mlp(mlp_projections(config, block), config.intermediate_size, config, projection)
    roles = block_norms(config, block)
    weights = floats(list(roles.values()))
    return Block(
        attention, mlp, {role: norm(config, w) for role, w in zip(roles, weights, strict=True)}
    )


def _mlp(
    names: dict[str, list[str]],
    inner: int,
    config: LlamaConfig,
    projection: Projector,
) -> MLP:
    return MLP(inner, projection(names["gate_up"]), projection(names["down"]), config.activation)


def norm(config: LlamaConfig, weight: torch.Tensor) -> RMSNorm:
    """An RMSNorm from its stored weight: Gemma's (1 + w) is added here, once, and kept in
    float32 (its reference scales in float32 before rounding)."""
    if config.norm_offset:
        weight = weight.float() + config.norm_offset
        return RMSNorm(weight, config.rms_norm_eps, scale_in_float=True)
    return RMSNorm(weight, config.rms_norm_eps)


def as_float(weight: Weight, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A weight that must be float (a norm, a bias, the router), whatever its stored form."""
    if isinstance(weight, QuantizedTensor):
        weight = weight.dequantize(dtype)
    return weight.to(device=device, dtype=dtype)
