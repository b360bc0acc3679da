"""Opening a model: from what the user named to the part this process runs, in one place.

Every process that holds part of a model opens it the same way: the master (embedding, head and
the blocks no worker serves), a worker (its topology entry's blocks), an empty worker (the
blocks a master assigned, from the folder it pushed), `cake-split-model` (only the folder and
config), the cluster planner and a draft model.

    model = open_model("path/to/folder-or.gguf")       folder + config (a GGUF: its metadata)
    compute = model.compute("auto", "auto", "int4")    device, dtype, quantization, context
    part = model.load(compute, blocks, with_ends=True) the modules, in their final form
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cake.host.devices import resolve_device
from cake.model.config import LlamaConfig
from cake.model.gguf import resolve_model_path
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
    name: str  # as the user named it: the folder's name, or the .gguf file's

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

    def load(self, compute: Compute, blocks: Sequence[int], with_ends: bool = False) -> Llama:
        """`blocks` (and with_ends, the embedding, the final norm and the head), built in their
        final form on the compute device."""
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
        )

    def tokenizer(self) -> Any:
        return load_tokenizer(self.folder)


def open_model(model: str | os.PathLike) -> OpenedModel:
    """A Hugging Face model folder or a .gguf file (its config and tokenizer are read into a
    cached folder once); ModelFolderError says what is wrong with either."""
    folder = resolve_model_path(model)
    return OpenedModel(folder, LlamaConfig.from_folder(folder), Path(model).name)
