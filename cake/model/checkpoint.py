"""Reading safetensors checkpoints: a single file or a sharded index, only the tensors asked for.

Tensors are memory-mapped by safetensors and converted straight into the target dtype and device,
so a worker that serves four blocks of a 70B model reads four blocks' worth of bytes. Weights a
bundle stores quantized (NAME.q / .scales / .zeros) come back as QuantizedTensor; a GGUF file
is read by cake/model/gguf.py behind the same interface (`open_checkpoint`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from cake.errors import ModelFolderError
from cake.model.config import LlamaConfig
from cake.model.gguf import GGUFCheckpoint, gguf_file_of
from cake.model.layout import EMBEDDING, FINAL_NORM, HEAD
from cake.model.quant import (
    QuantizedTensor,
    Weight,
)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# A model folder's files besides its weights: config, generation config, tokenizer. A bundle
# copies those present (cake/split.py); a model named by its hub id fetches them (hub.py).
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)


# A quantized weight `X.weight` is stored in a bundle as `X.weight.q` (I8, or U8 holding two
# 4-bit values), `X.weight.scales` (BF16) and, for int4, `X.weight.zeros` (BF16): see
# cake.model.quant.
QUANTIZED_SUFFIXES = (".q", ".scales", ".zeros")


def open_safetensors(path: Path, device: str = "cpu") -> Any:
    """`safe_open`, with a truncated or corrupt file as a ModelFolderError that says so."""
    try:
        return safe_open(str(path), framework="pt", device=device)
    except (SafetensorError, OSError) as exc:
        raise ModelFolderError(
            f"{path}: not a readable safetensors file ({exc}); it is truncated or corrupt: "
            "copy or download it again"
        ) from None


class Checkpoint:
    """Which file holds which tensor, for one model folder."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.file_of: dict[str, str] = self._read_layout()

    def _read_layout(self) -> dict[str, str]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ModelFolderError(f"{index}: not a safetensors index ({exc})") from None
            return dict(weight_map)
        files = [self.folder / SINGLE_FILE] if (self.folder / SINGLE_FILE).is_file() else []
        files = files or sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ModelFolderError(
                f"{self.folder}: no {SINGLE_FILE} or {INDEX_FILE}; cake reads safetensors "
                "checkpoints (convert .bin checkpoints, or pass a .gguf file as --model)"
            )
        layout: dict[str, str] = {}
        for path in files:
            with open_safetensors(path) as f:
                layout.update(dict.fromkeys(f.keys(), path.name))
        return layout

    def __contains__(self, name: str) -> bool:
        return name in self.file_of or name + ".q" in self.file_of

    @property
    def is_quantized(self) -> bool:
        return any(name.endswith(".q") for name in self.file_of)

    @property
    def files(self) -> list[str]:
        return sorted(set(self.file_of.values()))

    def path(self, file: str) -> Path:
        """Where one of `files` is. An index may name shards that are not here: a model named
        by its hub id fetches only the shards of the part it loads (see files_of_part)."""
        path = self.folder / file
        if not path.is_file():
            raise ModelFolderError(
                f"{self.folder / INDEX_FILE} names {file}, which is not in {self.folder}"
            )
        return path

    def files_of_part(self, blocks: Iterable[int], with_ends: bool) -> list[str]:
        """The files that hold the tensors of `blocks` (`model.layers.{i}.*`) and, with_ends,
        of the embedding, the final norm and the head: all that loading that part reads."""
        ends = (EMBEDDING, FINAL_NORM, HEAD) if with_ends else ()
        # A block's tensors, and an end stored as itself or as NAME.q / .scales / .zeros.
        prefixes = (*(f"model.layers.{i}." for i in blocks), *(f"{name}." for name in ends))
        files = {
            file for name, file in self.file_of.items() if name in ends or name.startswith(prefixes)
        }
        return sorted(files)

    def load(
        self,
        names: Iterable[str],
        dtype: torch.dtype | None,
        device: torch.device | str = "cpu",
        sources: dict[str, str] | None = None,
    ) -> dict[str, Weight]:
        """Load `names`; `sources` maps a wanted name to the stored name it is read from.

        Float tensors come in `dtype` (None: as stored) on `device`; a weight stored quantized
        comes as a QuantizedTensor on the CPU (the module that packs it puts it on its device).
        """
        sources = sources or {}
        wanted = {name: sources.get(name, name) for name in names}
        for name, stored in wanted.items():
            if stored not in self:
                raise ModelFolderError(
                    f"tensor {stored!r} (needed for {name!r}) is not in the checkpoint "
                    f"{self.folder} (files: {', '.join(self.files) or 'none'})"
                )
        parts = {  # stored name -> the safetensors entries it is made of
            stored: [stored] if stored in self.file_of else _quantized_parts(stored, self.file_of)
            for stored in set(wanted.values())
        }
        by_file: dict[str, list[str]] = {}
        for entries in parts.values():
            for entry in entries:
                by_file.setdefault(self.file_of[entry], []).append(entry)
        raw: dict[str, torch.Tensor] = {}
        device = torch.device(device)
        # safetensors can place tensors on CUDA directly; anything else goes through the CPU.
        open_device = str(device) if device.type == "cuda" else "cpu"
        for file, entries in by_file.items():
            with open_safetensors(self.path(file), open_device) as f:
                for entry in entries:
                    tensor = f.get_tensor(entry)
                    if entry not in wanted.values():  # part of a quantized weight: as stored
                        raw[entry] = tensor.to("cpu", copy=True)
                        continue
                    # copy=True: a tensor that still points into the memory-mapped file keeps
                    # every page of it that was read counted in this process's memory.
                    raw[entry] = tensor.to(device=device, dtype=dtype or tensor.dtype, copy=True)
        loaded: dict[str, Weight] = {}
        for stored, entries in parts.items():
            loaded[stored] = raw[stored] if entries == [stored] else _quantized(stored, raw)
        # A tied head shares the embedding's tensor: one copy in memory.
        return {name: loaded[stored] for name, stored in wanted.items()}


def _quantized_parts(name: str, file_of: dict[str, str]) -> list[str]:
    return [name + suffix for suffix in QUANTIZED_SUFFIXES if name + suffix in file_of]


def _quantized(name: str, raw: dict[str, torch.Tensor]) -> QuantizedTensor:
    """A weight stored as NAME.q / NAME.scales / NAME.zeros (see QUANTIZED_SUFFIXES)."""
    q, scales, zeros = raw[name + ".q"], raw.get(name + ".scales"), raw.get(name + ".zeros")
    if q.dtype == torch.int8 and scales is not None and scales.shape == q.shape[:1]:
        return QuantizedTensor("int8", q, scales)
    if (
        q.dtype == torch.uint8
        and scales is not None
        and zeros is not None
        and scales.dim() == 2
        and scales.shape == zeros.shape
        and scales.shape[0] == q.shape[0]
        and (q.shape[1] * 2) % scales.shape[1] == 0
    ):
        return QuantizedTensor("int4", q, scales, zeros, q.shape[1] * 2 // scales.shape[1])
    raise ModelFolderError(
        f"quantized weight {name!r}: its .q/.scales/.zeros tensors do not form int8 or int4 "
        "(see the README's bundle layout); write the bundle again with cake-split-model"
    )


def head_source(config: LlamaConfig, checkpoint: Checkpoint | GGUFCheckpoint) -> str:
    """The stored tensor the LM head reads: itself, or the embedding when the two are tied.

    This is the one place that knows about tied embeddings (SmolLM2, Llama 3.2 1B/3B).
    """
    if config.tie_word_embeddings or HEAD not in checkpoint:
        return EMBEDDING
    return HEAD


def open_checkpoint(folder: str | os.PathLike, config: LlamaConfig) -> Checkpoint | GGUFCheckpoint:
    """The tensors of a model folder: its safetensors, or the GGUF file it stands for."""
    gguf_path = gguf_file_of(Path(folder))
    if gguf_path is not None:
        return GGUFCheckpoint(gguf_path, config.n_heads, config.n_kv_heads)
    return Checkpoint(folder)
