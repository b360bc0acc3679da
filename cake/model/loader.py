"""Reading safetensors checkpoints: a single file or a sharded index, only the tensors asked for.

Tensors are memory-mapped by safetensors and converted straight into the target dtype and device,
so a worker that serves four blocks of a 70B model reads four blocks' worth of bytes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from cake.errors import ModelFolderError
from cake.host.devices import compute_dtype
from cake.host.memory import release_free_memory
from cake.host.progress import progress
from cake.model.assemble import as_float, build_block, norm
from cake.model.checkpoint import head_source, open_checkpoint
from cake.model.config import LlamaConfig
from cake.model.gguf import GGUFCheckpoint
from cake.model.gguf.mapped import MappedBlocks, page_in
from cake.model.gguf.mapped import enabled as maps
from cake.model.kernels.probe import activations_dtype, can_serve_rows
from cake.model.layout import EMBEDDING, FINAL_NORM, HEAD, checkpoint_shapes
from cake.model.linear import build_projection, describe, kernels_of
from cake.model.llama import Block, Llama
from cake.model.mapped_linear import (
    MappedEmbedding,
    MappedLinear,
    looks_up_mapped,
    mapped_kernels,
)
from cake.model.quant import (
    DEFAULT_GROUP_SIZE,
    Quantization,
    QuantizedTensor,
    Weight,
    quantize,
)
from cake.model.weight_cache import CachedPart, open_cache

Stored = Weight | MappedBlocks  # a weight as the checkpoint hands it over

log = logging.getLogger(__name__)


def activation_dtype(
    name: str,
    device: torch.device,
    folder: str | os.PathLike,
    config: LlamaConfig,
    quantization: Quantization | None,
) -> torch.dtype:
    """--dtype for a part: `auto` is what the quantized kernels take when its weights are
    quantized (given --quantize, or stored quantized: a GGUF or a quantized bundle; see
    kernels.probe.activations_dtype); otherwise devices.resolve_dtype decides."""
    quantized = name == "auto" and (
        quantization is not None or open_checkpoint(folder, config).is_quantized
    )
    return compute_dtype(name, device, activations_dtype(device) if quantized else None)


def load_llama(
    folder: str | os.PathLike,
    blocks: Sequence[int] = (),
    with_embedding: bool = False,
    with_head: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    max_seq_len: int = 4096,
    config: LlamaConfig | None = None,
    quantization: Quantization | None = None,
    on_block: Callable[[], None] | None = None,
) -> Llama:
    """Build the asked-for part of the model in its final form, one projection at a time
    (`on_block()` after each block: a worker's load progress).

    Each projection (fused q|k|v, o, gate|up, down) is read, checked, quantized or laid out for
    `device` and its source tensors dropped before the next is read, so loading holds the final
    weights plus one projection's temporaries.
    """
    config = config or LlamaConfig.from_folder(folder)
    device = torch.device(device)
    bad = [i for i in blocks if not 0 <= i < config.n_layers]
    if bad:
        raise ModelFolderError(
            f"blocks {bad} do not exist: the model in {folder} has {config.n_layers} blocks "
            f"(0-{config.n_layers - 1})"
        )
    checkpoint = open_checkpoint(folder, config)
    expected = checkpoint_shapes(config, blocks, with_embedding, with_head)
    scheme = quantization.scheme if quantization else None
    group = quantization.group_size if quantization else DEFAULT_GROUP_SIZE

    # GGUF blocks cake's CPU kernels read as stored are mapped, not read (gguf/mapped.py).
    mapped = {"mapped": True} if isinstance(checkpoint, GGUFCheckpoint) and maps() else {}

    def read(names: list[str], sources: dict[str, str] | None = None) -> list[Stored]:
        # Float weights that will be quantized are read as stored (quantize reads row chunks).
        tensors = checkpoint.load(
            names, None if scheme else dtype, "cpu" if scheme else device, sources, **mapped
        )
        for name in names:
            shape = tuple(tensors[name].shape)
            if shape != expected[name]:
                raise ModelFolderError(
                    f"tensor {(sources or {}).get(name, name)!r} in {folder} has shape {shape}, "
                    f"but config.json implies {expected[name]}"
                )
        return [tensors[name] for name in names]

    def floats(names: list[str]) -> list[torch.Tensor]:
        return [as_float(w, dtype, device) for w in checkpoint.load(names, dtype, device).values()]

    def project(weights: list[Stored]) -> nn.Module:
        return build_projection(weights, scheme, device, dtype, group)

    layers: dict[int, Block] = {}
    head = embedding = final_norm = None
    tied = with_head and head_source(config, checkpoint) == EMBEDDING
    serves_rows = tied and with_embedding

    def build_head() -> nn.Module:
        (weight,) = read([HEAD], {HEAD: head_source(config, checkpoint)})
        return _build_head(weight, scheme, serves_rows, device, dtype)

    with open_cache(cached_source(checkpoint), device, dtype, quantization) as cache:
        head_part = "head-rows" if serves_rows else "head"
        cache.expect([f"block-{i:04d}" for i in sorted(blocks)] + ([head_part] * with_head))
        for i in progress(sorted(blocks), "loading blocks", unit="block"):
            with cache.part(f"block-{i:04d}") as part:

                def projection(names: list[str], part: CachedPart = part) -> nn.Module:
                    return part.projection(names, lambda: project(read(names)))

                layers[i] = build_block(config, i, projection, floats)
            release_free_memory()
            if on_block is not None:
                on_block()
        if with_head:
            with cache.part(head_part) as part:
                head = part.projection([HEAD], build_head)
            final_norm = norm(config, floats([FINAL_NORM])[0])
        if with_embedding and not (tied and head is not None):  # while the last entries write
            (weight,) = read([EMBEDDING])
            embedding = embedding_module(weight, dtype, device)
    model = Llama(config, layers, embedding, final_norm, head, dtype=dtype, device=device)
    model.eval().requires_grad_(False)
    model.setup_rope(max_seq_len)
    # Every mapped block and head weight is read by the first forward; the embedding table's
    # rows only as tokens ask for them.
    computed = [*layers.values(), *([head] if head is not None else [])]
    page_in(m.blocks for part in computed for m in part.modules() if isinstance(m, MappedLinear))
    release_free_memory()
    summary = cache.summary()
    if summary:
        log.info("%s", summary)
    return model


def cached_source(checkpoint: object) -> Path | None:
    """The file whose packed weights the cache keeps: a GGUF's (its weights are converted and
    packed on every load); None for safetensors, read as stored."""
    return checkpoint.path if isinstance(checkpoint, GGUFCheckpoint) else None


def random_part(
    config: LlamaConfig,
    blocks: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    quantization: Quantization | None = None,
    max_seq_len: int = 256,
    seed: int = 0,
) -> Llama:
    """`blocks` with random weights (std 0.02, unit norms) in the form `load_llama` would give
    them: for timing a block of a model without its checkpoint (cake/cluster/measure.py)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = checkpoint_shapes(config, blocks, with_embedding=False, with_head=False)
    scheme = quantization.scheme if quantization else None
    group = quantization.group_size if quantization else DEFAULT_GROUP_SIZE

    def random(names: list[str]) -> list[Weight]:
        return [torch.randn(shapes[name], generator=generator) * 0.02 for name in names]

    def floats(names: list[str]) -> list[torch.Tensor]:
        # Norms at one (Gemma's offset form: zero), biases and routers small and random.
        return [
            (torch.full(shapes[n], 1.0 - config.norm_offset) if n.endswith("norm.weight") else
             torch.randn(shapes[n], generator=generator) * 0.02).to(device=device, dtype=dtype)
            for n in names
        ]  # fmt: skip

    def projection(names: list[str]) -> nn.Module:
        return build_projection(random(names), scheme, device, dtype, group)

    layers = {i: build_block(config, i, projection, floats) for i in blocks}
    model = Llama(config, layers, dtype=dtype, device=device)
    model.eval().requires_grad_(False)
    model.setup_rope(max_seq_len)
    return model


def head_weight(
    weight: Weight, scheme: str | None, serves_rows: bool, int4_rows: bool = False
) -> Weight:
    """What the LM head is made of: int8 when quantizing (see Quantization); a stored int4 head
    stays int4 unless it must also hand out embedding rows (tied) and no int4 kernel here keeps
    a layout that can (int4_rows: cake's own kernels read int4 as stored, torch's repack it)."""
    if isinstance(weight, QuantizedTensor):
        if weight.scheme == "int4" and serves_rows and not int4_rows:
            return weight.to_int8()
        return weight
    return quantize(weight, "int8") if scheme else weight


def embedding_module(weight: Stored, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """An untied embedding table: Q4 blocks this machine's kernels read are looked up where they
    lie in the mapped file; any other table is float (a stored quantized one dequantized)."""
    if isinstance(weight, MappedBlocks):
        if looks_up_mapped(device):
            return MappedEmbedding(weight, dtype)
        weight = weight.to_quantized()
    table = weight.dequantize(dtype) if isinstance(weight, QuantizedTensor) else weight.to(dtype)
    return nn.Embedding.from_pretrained(table.to(device))


def _build_head(
    weight: Stored, scheme: str | None, serves_rows: bool, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    if isinstance(weight, MappedBlocks):
        choice = mapped_kernels([weight], device, serves_rows, logits=True)
        if choice is not None:
            return MappedLinear(weight, dtype, choice)
        weight = weight.to_quantized()
    int4_rows = isinstance(weight, QuantizedTensor) and can_serve_rows(weight, device)
    return build_projection(
        [head_weight(weight, scheme, serves_rows, int4_rows)],
        None,
        device,
        dtype,
        serves_rows=serves_rows,
        logits=True,
    )


def describe_part(model: Llama) -> str:
    """What each kind of weight in a loaded part runs as, for the load log:
    'blocks int4/g32, head int8, activations bf16; kernels int4/g32 avx2'."""
    kinds: dict[str, None] = {}
    for block in model.model.layers.values():
        for module in block.projections():
            kinds[describe(module)] = None
    parts = []
    if kinds:
        parts.append(f"blocks {'+'.join(kinds)}")
    if model.head_proj is not None:
        parts.append(f"head {describe(model.head_proj)}")
    if model.model.embed_tokens is not None:
        parts.append(f"embedding {describe(model.model.embed_tokens)}")
    parts.append(f"activations {str(model.dtype).removeprefix('torch.')}")
    kernels = describe_kernels(model)
    return ", ".join(parts) + (f"; kernels {kernels}" if kernels else "")


def describe_kernels(model: Llama) -> str:
    """The kernels its quantized weights run, per format: 'int4/g32 avx2 decode, dequant-gemm
    prefill; int8 avx2' ('' for a float part)."""
    found = kernels_of([model])
    return "; ".join(f"{kind} {kernels}" for kind, kernels in found.items())
