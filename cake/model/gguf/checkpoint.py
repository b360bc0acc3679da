"""The tensors of a GGUF file under their Hugging Face names, each read from its own bytes.

Tensor bytes that are converted are read with plain file reads (pages of a mapping that were
read and then converted would stay counted in the process's resident memory beside the
converted copy). With `mapped`, Q4_0, Q4_1 and Q8_0 blocks, which cake's CPU kernels read as
stored, and float tensors come back as views of the mapped file instead (mapped.py): not read
at all until they are used or copied.

Which tensor is where comes from names.py (a 3-D expert tensor is indexed as one tensor per
expert); what its bytes become from blocks.py; here the stored conventions are undone (names.py
says which architecture has which):
- q_proj and k_proj rows are put back in Hugging Face order from llama.cpp's RoPE order (a
  permutation of whole rows, so quantized rows move unchanged; transformers does the same; a
  mapped weight keeps its rows and gathers its outputs instead);
- Gemma's norm weights, stored as 1 + w, become w (the block adds its offset back, in float32:
  (1 + w) - 1 is exact for the weights norms hold, so the scale is the stored one bit for bit).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from cake.errors import ModelFolderError
from cake.model.gguf.blocks import FLOAT_TYPES, decode
from cake.model.gguf.header import read_header
from cake.model.gguf.mapped import MappedBlocks, can_map, mapped_blocks, mapped_floats
from cake.model.gguf.names import NORMS_PLUS_ONE, ROPE_PERMUTED, tensor_index
from cake.model.quant import QuantizedTensor

Stored = torch.Tensor | QuantizedTensor | MappedBlocks


class GGUFCheckpoint:
    """The tensors of a GGUF file, under their Hugging Face names; loads only those asked for,
    each decoded from its own bytes (blocks.py says what each type becomes)."""

    def __init__(self, path: str | os.PathLike, n_heads: int, n_kv_heads: int) -> None:
        self.path = Path(path)
        self.folder = self.path  # for messages
        self.entries = tensor_index(self.path)
        arch = read_header(self.path).architecture
        permuted = arch in ROPE_PERMUTED
        self.heads = (
            {"self_attn.q_proj": n_heads, "self_attn.k_proj": n_kv_heads} if permuted else {}
        )
        self.norms_plus_one = arch in NORMS_PLUS_ONE

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
        mapped: bool = False,
    ) -> dict[str, torch.Tensor | QuantizedTensor | MappedBlocks]:
        """Float tensors in `dtype` on `device`; quantized ones as QuantizedTensor on the CPU,
        or with `mapped`, those whose blocks cake's kernels read as stored as MappedBlocks
        (views of the mapped file, nothing read yet)."""
        sources = sources or {}
        out: dict[str, torch.Tensor | QuantizedTensor | MappedBlocks] = {}
        with open(self.path, "rb") as file:
            for name in names:
                stored = sources.get(name, name)
                if stored not in self.entries:
                    raise ModelFolderError(
                        f"tensor {stored!r} (needed for {name!r}) is not in {self.path}"
                    )
                kind, shape, offset, nbytes = self.entries[stored]
                if mapped and can_map(kind, shape):
                    blocks = mapped_blocks(self.path, kind, (shape[0], shape[1]), offset, nbytes)
                    out[name] = self._as_stored_by_hugging_face(stored, blocks)
                    continue
                if mapped and kind in FLOAT_TYPES:
                    view = mapped_floats(self.path, kind, shape, offset, nbytes)
                    tensor = self._as_stored_by_hugging_face(stored, view)
                    out[name] = tensor.to(device=device, dtype=dtype or tensor.dtype)
                    continue
                file.seek(offset)
                raw = np.frombuffer(file.read(nbytes), dtype=np.uint8)
                if raw.size != nbytes:
                    raise ModelFolderError(f"{self.path}: truncated in tensor {stored!r}")
                tensor = self._as_stored_by_hugging_face(stored, decode(raw, kind, shape))
                if isinstance(tensor, torch.Tensor):
                    tensor = tensor.to(device=device, dtype=dtype or tensor.dtype)
                out[name] = tensor
        return out

    def _as_stored_by_hugging_face(self, name: str, tensor: Stored) -> Stored:
        if self.norms_plus_one and name.endswith("norm.weight"):
            return tensor.dequantize() - 1 if isinstance(tensor, QuantizedTensor) else tensor - 1
        module = name.rsplit(".", 1)[0].split(".", 3)[-1]  # "self_attn.q_proj"
        heads = self.heads.get(module)
        if heads is None:
            return tensor
        out = tensor.shape[0]
        order = torch.arange(out).reshape(heads, out // heads // 2, 2).transpose(1, 2).reshape(-1)
        if isinstance(tensor, (QuantizedTensor, MappedBlocks)):
            return tensor.rows(order)
        return tensor[order]
