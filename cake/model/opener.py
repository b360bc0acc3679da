"""Opening a model: from what the user named to the part this process runs, in one place.

Every process that holds part of a model opens it the same way: the master (embedding, head and
the blocks no worker serves), a worker (its topology entry's blocks), an empty worker (the
blocks a master assigned, from the folder it pushed), `cake-split-model` (only the folder and
config), the cluster planner and a draft model.

    model = open_model("path/to/folder-or.gguf")       folder + config (a GGUF: its metadata)
    model = open_model("ORG/NAME")                     the same, from the hub (cake/model/hub.py)
    compute = model.compute("auto", "auto", "int4")    device, dtype, quantization, context
    part = model.load(compute, blocks, with_ends=True) the modules, in their final form

A model named by its hub id is fetched as it is needed: its config and tokenizer when opened,
the shards that hold a part's tensors when that part is loaded (`fetch`), so a worker never
fetches what it does not run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cake.host.devices import resolve_device
from cake.model.checkpoint import Checkpoint
from cake.model.config import LlamaConfig
from cake.model.gguf import resolve_model_path
from cake.model.hub import HubShards, fetch_model, hub_name
from cake.model.llama import Llama
from cake.model.loader import activation_dtype, load_llama
from cake.model.quant import Quantization
from cake.model.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LEN = 4096  # the context when --max-seq-len is not given, at most


@dataclass(frozen=True)
class Compute:
    """How this process computes its part: fixed when it opens the model."""

    device: torch.device
    dtype: torch.dtype  # of the activations and KV caches
    quantization: Quantization | None  # --quantize: what float linear weights become
    max_seq_len: int  # positions a session holds


@dataclass(frozen=True)
class OpenedModel:
    """A model folder (a GGUF file stands for the folder of its metadata) and its config."""

    folder: Path
    config: LlamaConfig
    name: str  # as the user named it: the folder's name, the .gguf file's, or ORG/NAME[:QUANT]
    shards: HubShards | None = None  # a hub model's shards, fetched as parts need them

    def compute(
        self,
        device: str = "auto",
        dtype: str = "auto",
        quantize: str | None = None,
        max_seq_len: int | None = None,
    ) -> Compute:
        """The CLI's --device, --dtype, --quantize and --max-seq-len, resolved for this model:
        `auto` dtype is bf16 for quantized weights (given --quantize, or stored so)."""
        torch_device = resolve_device(device)
        quantization = Quantization(quantize) if quantize else None
        torch_dtype = activation_dtype(dtype, torch_device, self.folder, self.config, quantization)
        return Compute(torch_device, torch_dtype, quantization, self.context(max_seq_len))

    def context(self, max_seq_len: int | None) -> int:
        """--max-seq-len, or the model's own context capped at DEFAULT_MAX_SEQ_LEN."""
        trained = self.config.max_position_embeddings
        if max_seq_len is None:
            return min(trained, DEFAULT_MAX_SEQ_LEN)
        if max_seq_len > trained:
            log.warning(
                "--max-seq-len %d is beyond the %d positions the model was trained for; "
                "output quality past that is not guaranteed",
                max_seq_len,
                trained,
            )
        return max_seq_len

    def fetch(self, blocks: Iterable[int], with_ends: bool = False) -> None:
        """Make the files that hold `blocks` (and, with_ends, the embedding, the final norm and
        the head) local: a hub model fetches the shards that hold them, once, into the hub's
        cache; a folder or a .gguf file has them all."""
        if self.shards is not None:
            self.shards.fetch(Checkpoint(self.folder).files_of_part(blocks, with_ends))

    def load(
        self,
        compute: Compute,
        blocks: Sequence[int],
        with_ends: bool = False,
        on_block: Callable[[], None] | None = None,
    ) -> Llama:
        """`blocks` (and with_ends, the embedding, the final norm and the head), built in their
        final form on the compute device; `on_block()` after each block."""
        self.fetch(blocks, with_ends)
        return load_llama(
            self.folder,
            blocks,
            with_embedding=with_ends,
            with_head=with_ends,
            dtype=compute.dtype,
            device=compute.device,
            max_seq_len=compute.max_seq_len,
            config=self.config,
            quantization=compute.quantization,
            on_block=on_block,
        )

    def tokenizer(self) -> Any:
        return load_tokenizer(self.folder)


def open_model(model: str | os.PathLike) -> OpenedModel:
    """A Hugging Face model folder, a .gguf file (its config and tokenizer are read into a
    cached folder once), or a hub name ORG/NAME[@REVISION][:QUANT] that is no local path;
    ModelFolderError says what is wrong with any of them."""
    name = hub_name(model)
    if name is None:
        folder = resolve_model_path(model)
        return OpenedModel(folder, LlamaConfig.from_folder(folder), Path(model).name)
    path, shards = fetch_model(name)
    folder = resolve_model_path(path)
    return OpenedModel(folder, LlamaConfig.from_folder(folder), name.model_id, shards)
