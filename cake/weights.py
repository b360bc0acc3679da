"""Reading safetensors checkpoints: a single file or a sharded index, only the tensors asked for.

Tensors are memory-mapped by safetensors and converted straight into the target dtype and device,
so a worker that serves four blocks of a 70B model reads four blocks' worth of bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from cake.config import LlamaConfig, ModelFolderError
from cake.devices import release_free_memory
from cake.model import Llama

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
EMBEDDING = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


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
            for shard in set(weight_map.values()):
                if not (self.folder / shard).is_file():
                    raise ModelFolderError(f"{index} names {shard}, which is not in {self.folder}")
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
        return name in self.file_of

    @property
    def files(self) -> list[str]:
        return sorted(set(self.file_of.values()))

    def load(
        self,
        names: Iterable[str],
        dtype: torch.dtype | None,
        device: torch.device | str = "cpu",
        sources: dict[str, str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Load `names`; `sources` maps a wanted name to the stored name it is read from."""
        sources = sources or {}
        wanted = {name: sources.get(name, name) for name in names}
        for name, stored in wanted.items():
            if stored not in self.file_of:
                raise ModelFolderError(
                    f"tensor {stored!r} (needed for {name!r}) is not in the checkpoint "
                    f"{self.folder} (files: {', '.join(self.files) or 'none'})"
                )
        by_file: dict[str, list[str]] = {}
        for stored in set(wanted.values()):
            by_file.setdefault(self.file_of[stored], []).append(stored)
        loaded: dict[str, torch.Tensor] = {}
        device = torch.device(device)
        # safetensors can place tensors on CUDA directly; anything else goes through the CPU.
        open_device = str(device) if device.type == "cuda" else "cpu"
        for file, stored_names in by_file.items():
            with open_safetensors(self.folder / file, open_device) as f:
                for stored in stored_names:
                    tensor = f.get_tensor(stored)
                    # copy=True: a tensor that still points into the memory-mapped file keeps
                    # every page of it that was read counted in this process's memory.
                    loaded[stored] = tensor.to(
                        device=device, dtype=dtype or tensor.dtype, copy=True
                    )
        # A tied head shares the embedding's tensor: one copy in memory.
        return {name: loaded[stored] for name, stored in wanted.items()}


def head_source(config: LlamaConfig, checkpoint: Checkpoint) -> str:
    """The stored tensor the LM head reads: itself, or the embedding when the two are tied.

    This is the one place that knows about tied embeddings (SmolLM2, Llama 3.2 1B/3B).
    """
    if config.tie_word_embeddings or HEAD not in checkpoint:
        return EMBEDDING
    return HEAD


def load_llama(
    folder: str | os.PathLike,
    blocks: Sequence[int] = (),
    with_embedding: bool = False,
    with_head: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    max_seq_len: int = 4096,
    config: LlamaConfig | None = None,
) -> Llama:
    """Build the asked-for part of the model on `meta`, then assign its loaded weights."""
    config = config or LlamaConfig.from_folder(folder)
    bad = [i for i in blocks if not 0 <= i < config.n_layers]
    if bad:
        raise ModelFolderError(
            f"blocks {bad} do not exist: the model in {folder} has {config.n_layers} blocks "
            f"(0-{config.n_layers - 1})"
        )
    with torch.device("meta"):
        model = Llama(config, blocks, with_embedding, with_head)
    checkpoint = Checkpoint(folder)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    sources = {HEAD: head_source(config, checkpoint)} if with_head else {}
    # Block by block, each packed as soon as it is loaded (see Llama.pack): the checkpoint's
    # tensors of one block at most live beside the packed ones.
    for names in _load_groups(expected, blocks):
        tensors = checkpoint.load(names, dtype, device, sources)
        for name in names:
            if tuple(tensors[name].shape) != expected[name]:
                raise ModelFolderError(
                    f"tensor {sources.get(name, name)!r} in {folder} has shape "
                    f"{tuple(tensors[name].shape)}, but config.json implies {expected[name]}"
                )
        model.load_state_dict(tensors, assign=True, strict=False)
        del tensors
        model.pack()
    model.eval().requires_grad_(False)
    model.setup_rope(max_seq_len)
    release_free_memory()
    return model


def _load_groups(names: Iterable[str], blocks: Sequence[int]) -> list[list[str]]:
    """The tensor names of each block, then the rest (embedding, norm, head)."""
    groups: dict[str, list[str]] = {f"model.layers.{i}.": [] for i in blocks}
    rest: list[str] = []
    for name in names:
        prefix = ".".join(name.split(".")[:3]) + "."
        groups[prefix].append(name) if prefix in groups else rest.append(name)
    return [group for group in [*groups.values(), rest] if group]
