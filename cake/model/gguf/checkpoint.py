"""The tensors of a GGUF file under their Hugging Face names, read tensor by tensor.

Tensor bytes are read with plain file reads, not through gguf's memory map: mapped pages that
were read stay counted in the process's resident memory, which would double a worker's
footprint. The header is walked by our own few lines (header.py).

llama.cpp stores q_proj and k_proj with their rows permuted for its RoPE layout; they are put
back in Hugging Face order here (a permutation of whole rows, so quantized rows move unchanged).
"""

from __future__ import annotations

import functools
import math
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from cake.errors import ModelFolderError
from cake.model.gguf.blocks import FLOAT_TYPES, decode
from cake.model.gguf.header import Header
from cake.model.quant import QuantizedTensor

# GGUF (llama.cpp) tensor names -> Hugging Face names; {i} is the block index.
_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor (None for tensors cake does not use)."""
    if gguf_name in _NAMES:
        return _NAMES[gguf_name]
    match = _BLOCK.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}.weight"
    return None


class GGUFCheckpoint:
    """The tensors of a Llama GGUF file, under their Hugging Face names; loads only those asked
    for, each decoded from its own bytes (see the module docstring for what each type becomes).
    """

    def __init__(self, path: str | os.PathLike, n_heads: int, n_kv_heads: int) -> None:
        self.path = Path(path)
        self.folder = self.path  # for messages
        stat = self.path.stat()
        self.entries = _tensor_index(str(self.path.resolve()), stat.st_size, stat.st_mtime_ns)
        self.heads = {"self_attn.q_proj": n_heads, "self_attn.k_proj": n_kv_heads}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    @property
    def files(self) -> list[str]:
        return [self.path.name]

    @property
    def is_quantized(self) -> bool:
        return any(kind not in FLOAT_TYPES for kind, *_ in self.entries.values())

    def type_of(self, name: str) -> str:
        return self.entries[name][0]

    def load(
        self,
        names: Iterable[str],
        dtype: torch.dtype | None,
        device: torch.device | str = "cpu",
        sources: dict[str, str] | None = None,
    ) -> dict[str, torch.Tensor | QuantizedTensor]:
        """Float tensors in `dtype` on `device`; quantized ones as QuantizedTensor on the CPU."""
        sources = sources or {}
        out: dict[str, torch.Tensor | QuantizedTensor] = {}
        with open(self.path, "rb") as file:
            for name in names:
                stored = sources.get(name, name)
                if stored not in self.entries:
                    raise ModelFolderError(
                        f"tensor {stored!r} (needed for {name!r}) is not in {self.path}"
                    )
                kind, shape, offset, nbytes = self.entries[stored]
                file.seek(offset)
                raw = np.frombuffer(file.read(nbytes), dtype=np.uint8)
                if raw.size != nbytes:
                    raise ModelFolderError(f"{self.path}: truncated in tensor {stored!r}")
                tensor = decode(raw, kind, shape)
                tensor = self._unpermute(stored, tensor)
                if isinstance(tensor, torch.Tensor):
                    tensor = tensor.to(device=device, dtype=dtype or tensor.dtype)
                out[name] = tensor
        return out

    def _unpermute(
        self, name: str, tensor: torch.Tensor | QuantizedTensor
    ) -> torch.Tensor | QuantizedTensor:
        """Undo llama.cpp's RoPE row order of q_proj/k_proj (transformers does the same)."""
        module = name.rsplit(".", 1)[0].split(".", 3)[-1]  # "self_attn.q_proj"
        heads = self.heads.get(module)
        if heads is None:
            return tensor
        out = tensor.shape[0]
        order = torch.arange(out).reshape(heads, out // heads // 2, 2).transpose(1, 2).reshape(-1)
        return tensor.rows(order) if isinstance(tensor, QuantizedTensor) else tensor[order]


Entry = tuple[str, tuple[int, ...], int, int]  # type name, (out, in) or (n,), offset, bytes


@functools.lru_cache(maxsize=4)
def _tensor_index(path: str, size: int, mtime_ns: int) -> dict[str, Entry]:
    """Hugging Face name -> where its bytes lie; parsed once per file version and process.

    We walk the header ourselves rather than with gguf.GGUFReader: the reader builds numpy
    objects for every metadata value, and for a 49k-token vocabulary that parse alone peaked at
    160 MB (more for Llama 3's 128k), while this walk skips the values and keeps nothing.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        with open(path, "rb") as file:
            header = Header(file)
            entries = {}
            for gguf_name, dims, type_id, offset in header.tensors:
                name = hf_name(gguf_name)
                if name is None:
                    continue
                kind = GGMLQuantizationType(type_id)
                block, type_size = GGML_QUANT_SIZES[kind]
                count = math.prod(dims)
                shape = tuple(reversed(dims))  # GGUF lists the fastest-moving dimension first
                nbytes = count // block * type_size
                start = header.data_start + offset
                if start + nbytes > size:
                    raise ValueError(f"tensor {gguf_name} lies past the end of the file")
                entries[name] = (kind.name, shape, start, nbytes)
    except (ValueError, KeyError, struct.error, UnicodeDecodeError, OSError) as exc:
        raise ModelFolderError(f"{path}: not a readable GGUF file ({exc})") from exc
    return entries
