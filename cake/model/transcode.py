"""Bundles whose tensors change form on the way: `cake-split-model --quantize`, or a GGUF source.

A byte-for-byte copy (cake.split) is impossible here, so each bundle is written one block at a
time: the block's weights are read (from safetensors or the GGUF file), put in the form the
loader would give them (weights.head_weight, quant.quantize, ...), and written as one safetensors
shard per block, so memory holds one block whatever the model's size.

Quantized weights are stored in safetensors as three tensors beside each other (the layout of
cake.model.quant.QuantizedTensor; weights.QUANTIZED_SUFFIXES):
  NAME.q       int8 (out, in)             | uint8 (out, in/2): column 2j low nibble, 2j+1 high
  NAME.scales  bf16 (out,)                | bf16 (out, in/group)
  NAME.zeros   -                          | bf16 (out, in/group); w = (q - 8) * scale + zero
where NAME is the checkpoint's name (`model.layers.3.mlp.down_proj.weight`). Everything else
(norms, an untied embedding) is stored as a float tensor under its own name.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from cake.model.checkpoint import INDEX_FILE, Checkpoint, head_source, open_checkpoint
from cake.model.config import LlamaConfig
from cake.model.gguf import GGUFCheckpoint
from cake.model.layout import EMBEDDING, HEAD, checkpoint_shapes, is_linear_weight
from cake.model.loader import head_weight
from cake.model.quant import DEFAULT_GROUP_SIZE, Quantization, QuantizedTensor, Weight, quantize

log = logging.getLogger(__name__)


def flatten(name: str, weight: Weight) -> dict[str, torch.Tensor]:
    """One weight as the safetensors entries that store it."""
    if isinstance(weight, torch.Tensor):
        return {name: weight.contiguous()}
    entries = {f"{name}.q": weight.q.contiguous(), f"{name}.scales": weight.scales.contiguous()}
    if weight.zeros is not None:
        entries[f"{name}.zeros"] = weight.zeros.contiguous()
    return entries


def stored_groups(
    folder: Path,
    config: LlamaConfig,
    blocks: tuple[int, ...],
    is_master: bool,
    quantization: Quantization | None,
) -> Iterator[dict[str, torch.Tensor]]:
    """The safetensors entries of a bundle, one block (then the master's rest) at a time."""
    checkpoint = open_checkpoint(folder, config)
    shapes = checkpoint_shapes(config, blocks, is_master, is_master)
    tied = is_master and head_source(config, checkpoint) != HEAD
    if tied:
        del shapes[HEAD]  # the embedding is the head: stored once
    by_group: dict[str, list[str]] = {}
    for name in shapes:
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else "rest"
        by_group.setdefault(key, []).append(name)
    for names in by_group.values():
        entries: dict[str, torch.Tensor] = {}
        for name in names:
            entries.update(flatten(name, stored_form(checkpoint, name, quantization, tied)))
        yield entries


def stored_form(
    checkpoint: Checkpoint | GGUFCheckpoint,
    name: str,
    quantization: Quantization | None,
    tied: bool = False,
) -> Weight:
    """One checkpoint weight in the form its loader builds (`tied`: the embedding is the head):
    float linear weights quantized under `quantization`, stored quantized ones as they are,
    the head int8 when quantizing, an untied embedding float. What bundles and pushes store."""
    scheme = quantization.scheme if quantization else None
    group = quantization.group_size if quantization else DEFAULT_GROUP_SIZE
    (weight,) = checkpoint.load([name], None).values()
    if is_linear_weight(name):
        if isinstance(weight, torch.Tensor) and scheme:
            weight = quantize(weight, scheme, group)
    elif name == HEAD or (name == EMBEDDING and tied):
        weight = head_weight(weight, scheme, serves_rows=name == EMBEDDING)
    elif name == EMBEDDING and isinstance(weight, QuantizedTensor):
        weight = weight.dequantize(torch.bfloat16)
    return weight


def write_transcoded(
    folder: Path,
    config: LlamaConfig,
    quantization: Quantization | None,
    blocks: tuple[int, ...],
    is_master: bool,
    target: Path,
    progress: Callable[[int], object],
) -> int:
    """Write a bundle's shards and index into `target`; returns the bytes of tensors written."""
    count = len(blocks) + (1 if is_master else 0)  # a shard per block, the master's rest
    weight_map: dict[str, str] = {}
    total = 0
    groups = stored_groups(folder, config, blocks, is_master, quantization)
    for k, entries in enumerate(groups):
        shard = f"model-{k + 1:05d}-of-{count:05d}.safetensors"
        metadata = {"format": "pt"}
        if quantization:
            metadata["cake.quantize"] = quantization.scheme
        save_file(entries, str(target / shard), metadata=metadata)
        size = sum(t.numel() * t.element_size() for t in entries.values())
        total += size
        progress(size)
        weight_map.update(dict.fromkeys(entries, shard))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (target / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return total
