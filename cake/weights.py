"""Reading safetensors checkpoints: a single file or a sharded index, only the tensors asked for.

Tensors are memory-mapped by safetensors and converted straight into the target dtype and device,
so a worker that serves four blocks of a 70B model reads four blocks' worth of bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from cake.config import LlamaConfig, ModelFolderError
from cake.devices import compute_dtype, release_free_memory
from cake.gguf import GGUFCheckpoint, gguf_file_of
from cake.model import (
    EMBEDDING,
    FINAL_NORM,
    HEAD,
    NORMS,
    PROJECTIONS,
    Block,
    Llama,
    RMSNorm,
    checkpoint_shapes,
)
from cake.progress import progress
from cake.quant import (
    DEFAULT_GROUP_SIZE,
    SCHEMES,
    QuantizedTensor,
    Weight,
    build_projection,
    describe,
    quantize,
)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# A quantized weight `X.weight` is stored in a bundle as `X.weight.q` (I8, or U8 holding two
# 4-bit values), `X.weight.scales` (BF16) and, for int4, `X.weight.zeros` (BF16): see cake.quant.
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
        return name in self.file_of or name + ".q" in self.file_of

    @property
    def is_quantized(self) -> bool:
        return any(name.endswith(".q") for name in self.file_of)

    @property
    def files(self) -> list[str]:
        return sorted(set(self.file_of.values()))

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
            with open_safetensors(self.folder / file, open_device) as f:
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


@dataclass(frozen=True)
class Quantization:
    """--quantize: what float linear weights become (weights stored quantized stay as they are).

    The head becomes int8 whatever the scheme: it is the most quality-sensitive matrix, and
    when tied it doubles as the embedding table, whose rows only int8 can hand out cheaply.
    """

    scheme: str  # "int8" | "int4"
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"--quantize {self.scheme!r}: use {' or '.join(SCHEMES)}")
        if self.group_size <= 0 or self.group_size % 32:
            raise ValueError(f"int4 group size {self.group_size}: use a multiple of 32")


def activation_dtype(
    name: str,
    device: torch.device,
    folder: str | os.PathLike,
    config: LlamaConfig,
    quantization: Quantization | None,
) -> torch.dtype:
    """--dtype for a part: `auto` is bf16 when its weights are quantized (given --quantize, or
    stored quantized: a GGUF or a quantized bundle), because the quantized kernels compute in
    bf16; otherwise devices.resolve_dtype decides (devices.compute_dtype)."""
    quantized = name == "auto" and (
        quantization is not None or open_checkpoint(folder, config).is_quantized
    )
    return compute_dtype(name, device, quantized)


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
) -> Llama:
    """Build the asked-for part of the model in its final form, one projection at a time.

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

    def read(names: list[str], sources: dict[str, str] | None = None) -> list[Weight]:
        # Float weights that will be quantized are read as stored (quantize reads row chunks).
        tensors = checkpoint.load(
            names, None if scheme else dtype, "cpu" if scheme else device, sources
        )
        for name in names:
            shape = tuple(tensors[name].shape)
            if shape != expected[name]:
                raise ModelFolderError(
                    f"tensor {(sources or {}).get(name, name)!r} in {folder} has shape {shape}, "
                    f"but config.json implies {expected[name]}"
                )
        return [tensors[name] for name in names]

    def norm(name: str) -> RMSNorm:
        (weight,) = checkpoint.load([name], dtype, device).values()
        return RMSNorm(weight, config.rms_norm_eps)

    layers: dict[int, Block] = {}
    for i in progress(sorted(blocks), "loading blocks", unit="block"):
        prefix = f"model.layers.{i}."
        projections = {
            module: build_projection(
                read([f"{prefix}{part}.weight" for part in parts]), scheme, device, dtype, group
            )
            for module, parts in PROJECTIONS.items()
        }
        norms = {name: norm(f"{prefix}{name}.weight").weight for name in NORMS}
        layers[i] = Block(config, projections, norms)
        release_free_memory()
    head = embedding = final_norm = None
    tied = with_head and head_source(config, checkpoint) == EMBEDDING
    if with_head:
        (weight,) = read([HEAD], {HEAD: head_source(config, checkpoint)})
        head = _build_head(weight, scheme, tied and with_embedding, device, dtype)
        final_norm = norm(FINAL_NORM)
    if with_embedding and not (tied and head is not None):
        (weight,) = read([EMBEDDING])
        table = embedding_weight(weight, dtype).to(device)
        embedding = nn.Embedding.from_pretrained(table)
    model = Llama(config, layers, embedding, final_norm, head, dtype=dtype, device=device)
    model.eval().requires_grad_(False)
    model.setup_rope(max_seq_len)
    release_free_memory()
    return model


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
    them: for timing a block of a model without its checkpoint (cake/measure.py)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = checkpoint_shapes(config, blocks, with_embedding=False, with_head=False)
    scheme = quantization.scheme if quantization else None
    group = quantization.group_size if quantization else DEFAULT_GROUP_SIZE
    layers: dict[int, Block] = {}
    for i in blocks:
        prefix = f"model.layers.{i}."
        projections = {
            module: build_projection(
                [
                    torch.randn(shapes[f"{prefix}{part}.weight"], generator=generator) * 0.02
                    for part in parts
                ],
                scheme,
                device,
                dtype,
                group,
            )
            for module, parts in PROJECTIONS.items()
        }
        norms = {name: torch.ones(config.hidden_size, dtype=dtype, device=device) for name in NORMS}
        layers[i] = Block(config, projections, norms)
    model = Llama(config, layers, dtype=dtype, device=device)
    model.eval().requires_grad_(False)
    model.setup_rope(max_seq_len)
    return model


def head_weight(weight: Weight, scheme: str | None, serves_rows: bool) -> Weight:
    """What the LM head is made of: int8 when quantizing (see Quantization); a stored int4 head
    stays int4 unless it must also hand out embedding rows (tied), which only int8 does."""
    if isinstance(weight, QuantizedTensor):
        if weight.scheme == "int4" and serves_rows:
            return weight.to_int8()
        return weight
    return quantize(weight, "int8") if scheme else weight


def embedding_weight(weight: Weight, dtype: torch.dtype) -> torch.Tensor:
    """An untied embedding table stays float: a stored quantized one is dequantized."""
    return weight.dequantize(dtype) if isinstance(weight, QuantizedTensor) else weight.to(dtype)


def _build_head(
    weight: Weight, scheme: str | None, serves_rows: bool, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    return build_projection([head_weight(weight, scheme, serves_rows)], None, device, dtype)


def describe_part(model: Llama) -> str:
    """What each kind of weight in a loaded part runs as, for the load log:
    'blocks int4/g32, head int8, activations bf16'."""
    kinds: dict[str, None] = {}
    for block in model.model.layers.values():
        for module in (block.self_attn.qkv, block.self_attn.out, block.mlp.gate_up, block.mlp.down):
            kinds[describe(module)] = None
    parts = []
    if kinds:
        parts.append(f"blocks {'+'.join(kinds)}")
    if model.head_proj is not None:
        parts.append(f"head {describe(model.head_proj)}")
    if model.model.embed_tokens is not None:
        parts.append(f"embedding {describe(model.model.embed_tokens)}")
    parts.append(f"activations {str(model.dtype).removeprefix('torch.')}")
    return ", ".join(parts)
