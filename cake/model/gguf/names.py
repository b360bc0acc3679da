"""llama.cpp's tensor names, per architecture, as the Hugging Face names cake/model/layout.py reads.

A GGUF file names a model's architecture (`general.architecture`) the way llama.cpp's
convert_hf_to_gguf.py writes it: Llama, Mistral and Mixtral are all `llama` (Mixtral with
`llama.expert_count`), Qwen2/2.5 `qwen2`, Qwen3 `qwen3`, Qwen3-MoE `qwen3moe`, Phi-3/Phi-4 `phi3`
and Gemma 3 `gemma3`. Each tensor is `token_embd`, `output_norm`, `output` or `blk.N.<name>`,
with `.weight` or `.bias`; what a block's names mean depends on the architecture:

- Phi-3 keeps q|k|v fused (`attn_qkv`) and gate|up fused as its `ffn_up` (gate first).
- Gemma 3 normalises four times a block: `attn_norm`, `post_attention_norm`, `ffn_norm` (before
  the MLP) and `post_ffw_norm`.
- A mixture-of-experts block has a router (`ffn_gate_inp`) and its experts stacked in 3-D tensors
  (`ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`: (experts, out, in) in torch order). Each
  expert's weight is a contiguous slice of those bytes, so it is indexed here as a tensor of its
  own, under the name the Hugging Face checkpoint gives it: a worker reads only its blocks'
  experts, and each expert stays in its stored int4/int8 form (decoded one expert at a time).

Conventions of the stored values, undone when a tensor is read (checkpoint.py):
- `llama`: q and k rows permuted for llama.cpp's RoPE (the converter permutes them for this
  architecture only; the others use the rotate-half layout Hugging Face uses).
- `gemma3`: every norm weight stored as 1 + w (the converter adds Gemma's offset).

Tensors llama.cpp reads as the rotary frequencies (`rope_freqs`, `rope_factors_long/short`) are
read into the config (config.py). Any other tensor is a part of a model cake does not run: it is
refused, not skipped, so that a model is never run without one of its weights.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from cake.errors import ModelFolderError
from cake.model.gguf.header import GGUFHeader, read_header

# Hugging Face name -> (GGUF type, shape (out, in) or (n,), file offset, bytes)
Entry = tuple[str, tuple[int, ...], int, int]

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Read into the config, not as weights.
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")

# blk.N.<name> -> model.layers.N.<name>, for every architecture ...
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BIASES = {f"attn_{p}.bias": f"self_attn.{p}_proj.bias" for p in "qkv"}
_QK_NORMS = {f"attn_{p}_norm.weight": f"self_attn.{p}_norm.weight" for p in "qk"}
# ... and what some architectures add or name otherwise. {e}: an expert's index.
_MIXTRAL_MOE = {
    "ffn_gate_inp.weight": "block_sparse_moe.gate.weight",
    "ffn_gate_exps.weight": "block_sparse_moe.experts.{e}.w1.weight",
    "ffn_down_exps.weight": "block_sparse_moe.experts.{e}.w2.weight",
    "ffn_up_exps.weight": "block_sparse_moe.experts.{e}.w3.weight",
}
_QWEN_MOE = {
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_exps.weight": "mlp.experts.{e}.gate_proj.weight",
    "ffn_up_exps.weight": "mlp.experts.{e}.up_proj.weight",
    "ffn_down_exps.weight": "mlp.experts.{e}.down_proj.weight",
}
_PHI3_FUSED = {  # q|k|v in one, gate|up in one (gate first)
    "attn_qkv.weight": "self_attn.qkv_proj.weight",
    "ffn_up.weight": "mlp.gate_up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GEMMA_NORMS = {
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_ATTENTION = {k: v for k, v in _BLOCK.items() if not k.startswith("ffn_") or k == "ffn_norm.weight"}
_UNFUSED = ("attn_q.weight", "attn_k.weight", "attn_v.weight")
BLOCK_NAMES: dict[str, dict[str, str]] = {
    "llama": {**_BLOCK, **_MIXTRAL_MOE},
    "qwen2": {**_BLOCK, **_BIASES},
    "qwen3": {**_BLOCK, **_BIASES, **_QK_NORMS},
    "qwen3moe": {**_ATTENTION, **_BIASES, **_QK_NORMS, **_QWEN_MOE},  # experts in every block
    "phi3": {**{k: v for k, v in _ATTENTION.items() if k not in _UNFUSED}, **_PHI3_FUSED},
    "gemma3": {**_BLOCK, **_QK_NORMS, **_GEMMA_NORMS},
}
ARCHITECTURES = tuple(BLOCK_NAMES)
ROPE_PERMUTED = ("llama",)  # q/k rows in llama.cpp's RoPE order
NORMS_PLUS_ONE = ("gemma3",)  # norm weights stored as 1 + w

_IN_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
# Mixtral as llama.cpp wrote it before 2024-04: one tensor per expert. llama.cpp reads these no
# more (its llama loader takes only the 3-D ffn_*_exps).
_SPLIT_EXPERT = re.compile(r"ffn_(gate|up|down)\.\d+\.weight")


def supported() -> str:
    return ", ".join(ARCHITECTURES)


def check_architecture(header: GGUFHeader) -> str:
    arch = header.architecture
    if arch not in BLOCK_NAMES:
        raise ModelFolderError(
            f"{header.path}: a GGUF file of architecture {arch!r}; cake reads these GGUF "
            f"architectures: {supported()} (Llama, Mistral and Mixtral are 'llama')"
        )
    return arch


def tensor_index(path: str | os.PathLike) -> dict[str, Entry]:
    """Hugging Face name -> where its bytes lie, for every weight of the file."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _index(str(resolved), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _index(path: str, size: int, mtime_ns: int) -> dict[str, Entry]:
    header = read_header(path)
    names = BLOCK_NAMES[check_architecture(header)]
    entries: dict[str, Entry] = {}
    for gguf_name, info in header.tensors.items():
        entry: Entry = (info.kind, info.shape, info.offset, info.nbytes)
        if gguf_name in _GLOBAL:
            entries[_GLOBAL[gguf_name]] = entry
            continue
        if gguf_name in ROPE_TENSORS:
            continue
        match = _IN_BLOCK.fullmatch(gguf_name)
        name = names.get(match.group(2)) if match else None
        if name is None:
            raise ModelFolderError(_unknown(header, gguf_name))
        prefix = f"model.layers.{match.group(1)}."
        if "{e}" not in name:
            entries[prefix + name] = entry
            continue
        if len(info.shape) != 3:
            raise ModelFolderError(
                f"{header.path}: expert tensor {gguf_name!r} has shape {info.shape}; llama.cpp "
                "stacks a block's experts in one 3-D tensor (experts, out, in)"
            )
        n_experts, rows, cols = info.shape
        each = info.nbytes // n_experts  # experts lie one after another, whole blocks each
        for e in range(n_experts):
            entries[prefix + name.format(e=e)] = (
                info.kind,
                (rows, cols),
                info.offset + e * each,
                each,
            )
    return entries


def _unknown(header: GGUFHeader, gguf_name: str) -> str:
    arch = header.architecture
    block = _IN_BLOCK.fullmatch(gguf_name)
    if block and _SPLIT_EXPERT.fullmatch(block.group(2)):
        return (
            f"{header.path}: tensor {gguf_name!r} holds one expert on its own, the layout "
            "llama.cpp wrote for Mixtral before April 2024 and reads no more; convert the model "
            "again with a current llama.cpp (convert_hf_to_gguf.py stacks each block's experts "
            "in ffn_gate_exps, ffn_up_exps and ffn_down_exps)"
        )
    if block and block.group(2).startswith("ffn_gate_up_exps"):
        return (
            f"{header.path}: tensor {gguf_name!r} fuses the experts' gate and up projections "
            "(convert_hf_to_gguf.py --fuse-gate-up-exps), which cake does not read; convert "
            "the model without that option"
        )
    return (
        f"{header.path}: tensor {gguf_name!r} is not part of a {arch!r} model as cake runs it "
        f"(a {arch} block holds {', '.join(sorted(BLOCK_NAMES[arch]))}); this file holds more "
        "than cake's families run, so cake refuses it rather than run without that weight"
    )
