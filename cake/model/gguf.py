"""`--model file.gguf`: GGUF read natively, tensor by tensor, only the blocks asked for.

Nothing is converted to a float copy. What is cached is small: the file's config and tokenizer
(read from its metadata with transformers, once) as config.json, generation_config.json and
tokenizer files in `$CAKE_CACHE_DIR/gguf-metadata/<name>-<key>/` (default `~/.cache/cake`),
keyed by the file's absolute path, size and modification time, plus `gguf.json` naming the
file. The weights
are read from the GGUF file itself by `GGUFCheckpoint` whenever a model part is loaded.

What each GGUF tensor type becomes (cake.model.quant's forms; exact means bit-exact up to the bf16
rounding of scales and zeros):
- Q4_0, Q4_1, Q4_K: int4 in groups of 32, exactly (w = (q - 8) * s + z with s = d, z = 0 for
  Q4_0; s = d, z = m + 8d for Q4_1; s = d * sc, z = 8 * d * sc - dmin * m for Q4_K's sub-blocks).
- Q8_0, Q5_0, Q5_1, Q5_K, Q6_K (and other types gguf can decode): int8 per output channel,
  requantized from their decoded values (one tensor at a time; int8's per-row step is finer than
  these formats' own, see README). Torch has no kernel for int8 in groups.
- F32, F16, BF16: float tensors, handled like any checkpoint's (the run dtype, or --quantize).
The embedding table is a float table in the run dtype unless it doubles as a quantized head.

llama.cpp stores q_proj and k_proj with their rows permuted for its RoPE layout; they are put
back in Hugging Face order here (a permutation of whole rows, so quantized rows move unchanged).

Tensor bytes are read with plain file reads, not through gguf's memory map: mapped pages that
were read stay counted in the process's resident memory, which would double a worker's
footprint. The header is walked by our own few lines (see _tensor_index).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO, ClassVar

import numpy as np
import torch

from cake.errors import ModelFolderError
from cake.host.cache import cache_root
from cake.model.quant import CHUNK_ROWS, KERNEL_DTYPE, QuantizedTensor, pack_nibbles, quantize

log = logging.getLogger(__name__)

POINTER_FILE = "gguf.json"  # in the metadata folder: which GGUF file holds the weights
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
FLOAT_TYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor (None for tensors cake does not use)."""
    if gguf_name in _NAMES:
        return _NAMES[gguf_name]
    match = _BLOCK.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}.weight"
    return None


# ---------------------------------------------------------------------------------------------
# The model folder: config and tokenizer from the metadata, cached; weights stay in the file.


def metadata_folder(gguf_path: str | os.PathLike) -> Path:
    """Where this GGUF file's config and tokenizer are cached (whether or not they are yet)."""
    path = Path(gguf_path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    # Not "gguf/": cake before 0.2 kept f32 conversions there under the same names. Named
    # after the path given: a file fetched from the hub resolves to a blob named by its hash.
    return cache_root() / "gguf-metadata" / f"{Path(gguf_path).stem}-{key}"


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A model folder as is; for a .gguf file, the folder of its cached config and tokenizer
    (written once, a few MB), whose gguf.json points the loader at the file's tensors."""
    path = Path(model)
    if path.is_dir():
        return path
    if not path.exists():
        raise ModelFolderError(
            f"{path}: no such model folder or file; --model takes a Hugging Face model folder, "
            "a .gguf file or a model's hub name (ORG/NAME)"
        )
    if path.suffix.lower() != ".gguf":
        raise ModelFolderError(
            f"{path}: not a folder and not a .gguf file; --model takes a Hugging Face model "
            "folder, a .gguf file or a model's hub name (ORG/NAME)"
        )
    target = metadata_folder(path)
    if (target / POINTER_FILE).is_file():
        return target
    log.info("reading config and tokenizer of %s into %s (once)", path, target)
    write_metadata_folder(path, target)
    return target


def write_metadata_folder(gguf_path: Path, target: Path) -> None:
    """config.json, generation_config.json and tokenizer files from the GGUF's metadata."""
    import transformers

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # transformers raises many types for unreadable/unsupported files
        raise ModelFolderError(f"{gguf_path}: cannot read this GGUF file ({exc})") from exc
    data = config.to_dict()
    if data.get("model_type") != "llama":
        raise ModelFolderError(
            f"{gguf_path}: a {data.get('model_type')!r} model; cake runs Llama models only"
        )
    data.pop("quantization_config", None)
    data["architectures"] = ["LlamaForCausalLM"]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        (staging / "config.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
        generation = transformers.GenerationConfig.from_model_config(config)
        generation.to_json_file(str(staging / "generation_config.json"))
        tokenizer.save_pretrained(str(staging))
        pointer = {"gguf": str(gguf_path.resolve())}
        (staging / POINTER_FILE).write_text(json.dumps(pointer) + "\n", encoding="utf-8")
        if target.exists():  # another process finished first: keep theirs
            shutil.rmtree(staging)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def gguf_file_of(folder: Path) -> Path | None:
    """The GGUF file a metadata folder stands for, or None for an ordinary model folder."""
    pointer = folder / POINTER_FILE
    if not pointer.is_file():
        return None
    path = Path(json.loads(pointer.read_text(encoding="utf-8"))["gguf"])
    if not path.is_file():
        raise ModelFolderError(f"{pointer} names {path}, which no longer exists")
    return path


# ---------------------------------------------------------------------------------------------
# Tensors.


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
            header = _Header(file)
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


class _Header:
    """GGUF v2/v3 header walk: metadata skipped (but for the alignment), tensor infos kept."""

    # Fixed-size metadata value types -> struct format (the spec's type ids).
    _SCALARS: ClassVar[dict[int, str]] = dict(enumerate("BbHhIif?")) | {10: "Q", 11: "q", 12: "d"}
    _STRING, _ARRAY = 8, 9

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        if file.read(4) != b"GGUF":
            raise ValueError("no GGUF magic")
        (version,) = self._unpack("<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old (need 2 or later)")
        n_tensors, n_kv = self._unpack("<QQ")
        alignment = 32
        for _ in range(n_kv):
            key = self._string()
            (value_type,) = self._unpack("<I")
            if key == "general.alignment" and value_type == 4:
                (alignment,) = self._unpack("<I")
            else:
                self._skip(value_type)
        self.tensors = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            type_id, offset = self._unpack("<IQ")
            self.tensors.append((name, dims, type_id, offset))
        position = file.tell()
        self.data_start = position + (-position % alignment)

    def _unpack(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        data = self.file.read(size)
        if len(data) != size:
            raise ValueError("the header ends early")
        return struct.unpack(fmt, data)

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        return self.file.read(length).decode("utf-8")

    def _skip(self, value_type: int) -> None:
        if value_type in self._SCALARS:
            self.file.seek(struct.calcsize(self._SCALARS[value_type]), 1)
        elif value_type == self._STRING:
            (length,) = self._unpack("<Q")
            self.file.seek(length, 1)
        elif value_type == self._ARRAY:
            item_type, count = self._unpack("<IQ")
            if item_type in self._SCALARS:
                self.file.seek(count * struct.calcsize(self._SCALARS[item_type]), 1)
            else:
                for _ in range(count):
                    self._skip(item_type)
        else:
            raise ValueError(f"unknown metadata value type {value_type}")


def decode(raw: np.ndarray, kind: str, shape: tuple[int, ...]) -> torch.Tensor | QuantizedTensor:
    """One GGUF tensor's bytes -> a float tensor (float types) or a QuantizedTensor."""
    if kind in FLOAT_TYPES:
        values = torch.from_numpy(raw.view(FLOAT_TYPES[kind]).copy()).reshape(shape)
        return values.view(torch.bfloat16) if kind == "BF16" else values
    if len(shape) != 2:
        raise ModelFolderError(f"a {kind} tensor of shape {shape}: cake expects 2-D weights")
    out, cols = shape
    # Row chunks keep the decoding temporaries (f32 values are 8x a Q4 tensor's bytes) small.
    row_bytes = raw.size // out
    int4 = kind in INT4_TYPES
    result = QuantizedTensor.empty("int4" if int4 else "int8", out, cols, 32)
    for start in range(0, out, CHUNK_ROWS):
        rows = min(CHUNK_ROWS, out - start)
        chunk = raw[start * row_bytes : (start + rows) * row_bytes]
        if int4:
            result.fill(start, decode_int4(chunk, kind, rows, cols))
        else:
            values = torch.from_numpy(dequantize_rows(chunk, kind, rows, cols))
            result.fill(start, quantize(values, "int8"))
    return result


def dequantize_rows(raw: np.ndarray, kind: str, out: int, cols: int) -> np.ndarray:
    """f32 (out, cols) values of a quantized tensor: Q8_0 here, other types by gguf's decoder."""
    if kind == "Q8_0":
        blocks = raw.reshape(-1, 34)
        scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (n, 1)
        values = blocks[:, 2:].copy().view(np.int8).astype(np.float32)  # (n, 32)
        return (values * scale).reshape(out, cols)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        qtype = GGMLQuantizationType[kind]
        return dequantize(raw.reshape(out, -1), qtype).reshape(out, cols).astype(np.float32)
    except (KeyError, NotImplementedError) as exc:
        raise ModelFolderError(f"GGUF tensor type {kind} is not supported ({exc})") from None


def decode_int4(raw: np.ndarray, kind: str, out: int, cols: int) -> QuantizedTensor:
    """Q4_0 / Q4_1 / Q4_K bytes -> int4 groups of 32, without going through floats."""
    groups = out * cols // 32
    if kind == "Q4_0":  # 18 bytes per 32 values: d (f16), 16 bytes of nibbles
        blocks = raw.reshape(groups, 18)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
        zero = np.zeros_like(d)
        nibbles = blocks[:, 2:]
    elif kind == "Q4_1":  # 20 bytes: d, m (f16), 16 bytes of nibbles; w = d * q + m
        blocks = raw.reshape(groups, 20)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
        zero = m + 8 * d
        nibbles = blocks[:, 4:]
    else:  # Q4_K: 144 bytes per 256 values, 8 sub-blocks of 32 with 6-bit scales and mins
        supers = raw.reshape(groups // 8, 144)
        d = supers[:, :2].copy().view(np.float16).astype(np.float32)  # (n, 1)
        dmin = supers[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mn = _q4k_scales_mins(supers[:, 4:16])  # (n, 8) each
        d_sub = (d * sc).reshape(-1)  # (groups,)
        zero = 8 * d_sub - (dmin * mn).reshape(-1)
        d = d_sub
        # qs: 4 chunks of 32 bytes; a chunk's low nibbles are sub-block 2c, its high ones 2c+1.
        qs = supers[:, 16:].reshape(-1, 4, 32)
        values = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(groups, 32)
        return _int4(values, d, zero, out, cols)
    # Q4_0/Q4_1: a block's low nibbles are values 0-15, its high nibbles values 16-31.
    values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1)  # (groups, 32)
    return _int4(values, d, zero, out, cols)


def _q4k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes of 6-bit scales and mins for 8 sub-blocks -> two (n, 8) float arrays."""
    b = packed.reshape(-1, 3, 4)
    d, m, m_d = b[:, 0], b[:, 1], b[:, 2]
    scales = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _int4(
    values: np.ndarray, scale: np.ndarray, zero: np.ndarray, out: int, cols: int
) -> QuantizedTensor:
    q = pack_nibbles(torch.from_numpy(np.ascontiguousarray(values)).reshape(out, cols))
    scales = torch.from_numpy(scale).reshape(out, cols // 32).to(KERNEL_DTYPE)
    zeros = torch.from_numpy(zero).reshape(out, cols // 32).to(KERNEL_DTYPE)
    return QuantizedTensor("int4", q, scales, zeros, 32)
