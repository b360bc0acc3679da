"""Which checkpoint tensors make which module of a block, per family: the one list of what a
part of a model reads (the loader, bundles, pushes and placement all ask here).

Names are the Hugging Face checkpoint's. The runtime fuses some of them: q|k|v into one
projection and gate|up into another (one matrix call each is what decode speed needs); Phi-3
stores them fused already. A mixture-of-experts block has a router and, per expert, its own
gate|up and down.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from cake.model.config import LlamaConfig

EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
HEAD = "lm_head.weight"

# Norms by their role in the block -> checkpoint name. A plain block normalises before
# attention and before the MLP; Gemma 3 also normalises both outputs ("sandwich").
ATTENTION_IN, ATTENTION_OUT, MLP_IN, MLP_OUT = "attn_in", "attn_out", "mlp_in", "mlp_out"

# Checkpoint names of linear weights (what --quantize quantizes), whatever the family: the
# router (`mlp.gate`, `block_sparse_moe.gate`) stays float.
_LINEAR = re.compile(
    r"\.(self_attn\.(q|k|v|o|qkv)_proj|mlp\.(gate|up|down|gate_up)_proj"
    r"|mlp\.experts\.\d+\.(gate|up|down)_proj|block_sparse_moe\.experts\.\d+\.w[123])\.weight$"
)


def is_linear_weight(name: str) -> bool:
    return _LINEAR.search(name) is not None


def block_norms(config: LlamaConfig, block: int) -> dict[str, str]:
    """Role -> checkpoint name of the block's norms (hidden_size each)."""
    prefix = f"model.layers.{block}."
    if config.sandwich_norms:
        names = {
            ATTENTION_IN: "input_layernorm",
            ATTENTION_OUT: "post_attention_layernorm",
            MLP_IN: "pre_feedforward_layernorm",
            MLP_OUT: "post_feedforward_layernorm",
        }
    else:
        names = {ATTENTION_IN: "input_layernorm", MLP_IN: "post_attention_layernorm"}
    return {role: f"{prefix}{name}.weight" for role, name in names.items()}


def head_norms(config: LlamaConfig, block: int) -> dict[str, str]:
    """ "q"/"k" -> the per-head norms applied to q and k (head_dim each), where the family has
    them."""
    if not config.qk_norm:
        return {}
    prefix = f"model.layers.{block}.self_attn."
    return {"q": f"{prefix}q_norm.weight", "k": f"{prefix}k_norm.weight"}


def attention_projections(config: LlamaConfig, block: int) -> dict[str, list[str]]:
    """'qkv' and 'out' -> the checkpoint weights each is built from, in output order."""
    prefix = f"model.layers.{block}.self_attn."
    if config.fused_checkpoint:
        qkv = [f"{prefix}qkv_proj.weight"]
    else:
        qkv = [f"{prefix}{p}_proj.weight" for p in ("q", "k", "v")]
    return {"qkv": qkv, "out": [f"{prefix}o_proj.weight"]}


def attention_biases(config: LlamaConfig, block: int) -> list[str]:
    """The q, k and v biases (Qwen2), in output order; none for most families."""
    if not config.attention_bias:
        return []
    prefix = f"model.layers.{block}.self_attn."
    return [f"{prefix}{p}_proj.bias" for p in ("q", "k", "v")]


def mlp_projections(config: LlamaConfig, block: int) -> dict[str, list[str]]:
    """A dense block's 'gate_up' and 'down' -> the checkpoint weights each is built from."""
    prefix = f"model.layers.{block}.mlp."
    if config.fused_checkpoint:
        return {"gate_up": [f"{prefix}gate_up_proj.weight"], "down": [f"{prefix}down_proj.weight"]}
    return {
        "gate_up": [f"{prefix}gate_proj.weight", f"{prefix}up_proj.weight"],
        "down": [f"{prefix}down_proj.weight"],
    }


def router(config: LlamaConfig, block: int) -> str:
    """A sparse block's router weight (n_experts, hidden)."""
    if config.family == "mixtral":
        return f"model.layers.{block}.block_sparse_moe.gate.weight"
    return f"model.layers.{block}.mlp.gate.weight"


def expert_projections(config: LlamaConfig, block: int, expert: int) -> dict[str, list[str]]:
    """One expert's 'gate_up' and 'down' -> the checkpoint weights each is built from."""
    if config.family == "mixtral":
        prefix = f"model.layers.{block}.block_sparse_moe.experts.{expert}."
        return {
            "gate_up": [f"{prefix}w1.weight", f"{prefix}w3.weight"],
            "down": [f"{prefix}w2.weight"],
        }
    prefix = f"model.layers.{block}.mlp.experts.{expert}."
    return {
        "gate_up": [f"{prefix}gate_proj.weight", f"{prefix}up_proj.weight"],
        "down": [f"{prefix}down_proj.weight"],
    }


def block_shapes(config: LlamaConfig, block: int) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape, for every tensor of one block."""
    c = config
    hidden, q_out, kv_out = c.hidden_size, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {}
    qkv = attention_projections(c, block)
    if c.fused_checkpoint:
        shapes[qkv["qkv"][0]] = (q_out + 2 * kv_out, hidden)
    else:
        shapes.update(
            zip(qkv["qkv"], [(q_out, hidden), (kv_out, hidden), (kv_out, hidden)], strict=True)
        )
    shapes[qkv["out"][0]] = (hidden, q_out)
    if c.attention_bias:
        biases = attention_biases(c, block)
        shapes.update(zip(biases, [(q_out,), (kv_out,), (kv_out,)], strict=True))
    shapes.update(dict.fromkeys(head_norms(c, block).values(), (c.head_dim,)))
    if c.is_sparse(block):
        shapes[router(c, block)] = (c.n_experts, hidden)
        for expert in range(c.n_experts):
            shapes.update(
                _mlp_shapes(
                    expert_projections(c, block, expert), c.expert_intermediate_size, hidden, False
                )
            )
    else:
        shapes.update(
            _mlp_shapes(mlp_projections(c, block), c.intermediate_size, hidden, c.fused_checkpoint)
        )
    shapes.update(dict.fromkeys(block_norms(c, block).values(), (hidden,)))
    return shapes


def _mlp_shapes(
    names: dict[str, list[str]], inner: int, hidden: int, fused: bool
) -> dict[str, tuple[int, ...]]:
    if fused:
        shapes = {names["gate_up"][0]: (2 * inner, hidden)}
    else:
        shapes = dict.fromkeys(names["gate_up"], (inner, hidden))
    shapes[names["down"][0]] = (hidden, inner)
    return shapes


def checkpoint_shapes(
    config: LlamaConfig, blocks: Iterable[int], with_embedding: bool, with_head: bool
) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, for the part of the model that holds `blocks` (and the
    embedding, and the final norm with the head). The one list of what a part reads."""
    c = config
    shapes: dict[str, tuple[int, ...]] = {}
    if with_embedding:
        shapes[EMBEDDING] = (c.vocab_size, c.hidden_size)
    for i in sorted(blocks):
        shapes.update(block_shapes(c, i))
    if with_head:
        shapes[FINAL_NORM] = (c.hidden_size,)
        shapes[HEAD] = (c.vocab_size, c.hidden_size)
    return shapes
