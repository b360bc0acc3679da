"""What an empty worker receives for its blocks (the master's side of a push).

* :class:`ModelManifest` hashes every stored tensor of a model and its small files once (sha256
  of each tensor's stored bytes, read straight from the safetensors files or the GGUF file); the
  hashes are cached under ``$CAKE_CACHE_DIR/manifests`` keyed by the files' names, sizes and
  modification times. Its :attr:`~ModelManifest.fingerprint` is the model's *content*.
* :class:`Payload` is the one place that decides what travels, and in which form:

  - a safetensors folder without ``--quantize``: the stored tensors, byte for byte (read from
    the files as they are sent; the worker casts to its --dtype while loading, as from any
    folder);
  - ``--quantize``, or any GGUF file: what the worker will run. Each weight is converted as the
    loader would convert it (`transcode.stored_form`: float linear weights quantized, GGUF
    blocks decoded onto int4/int8, q/k rows in Hugging Face order) and travels in the quantized
    bundle layout (``NAME.q``, ``NAME.scales``, ``NAME.zeros``; see transcode.py), so an int4
    push carries about 0.16 of the float32 bytes and the worker loads it with no conversion.

  A converted payload has a cache key of its own (:attr:`Payload.model`), and the sha256 of each
  converted tensor must be in its offer before any byte is sent: the first push of a model
  converts every pushed weight once to hash it (cached beside the manifest: conversion is
  deterministic), and converts again, one weight at a time, only what a worker lacks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cake.errors import ModelFolderError
from cake.host.cache import cache_root
from cake.host.progress import progress_bar
from cake.host.sizes import format_size
from cake.model.checkpoint import open_checkpoint
from cake.model.config import LlamaConfig
from cake.model.gguf import FLOAT_TYPES, INT4_TYPES, GGUFCheckpoint, gguf_file_of
from cake.model.quant import Quantization
from cake.wire.protocol import PUSH_FILES, PushOffer

log = logging.getLogger(__name__)

HASH_BLOCK = 8 << 20
MANIFEST_VERSION = 1
# Bump when what a conversion produces changes: converted payloads get new cache keys.
CONVERSION_VERSION = 1

# torch dtype -> safetensors spelling, for converted tensors.
SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int8: "I8",
    torch.uint8: "U8",
}


@dataclass(frozen=True)
class PushItem:
    """One tensor or file as it travels: its identity, its hash, where its bytes come from."""

    kind: str  # "tensor" or "file"
    name: str
    dtype: str  # safetensors spelling for a tensor, "" for a file
    shape: tuple[int, ...]
    nbytes: int
    sha256: str
    path: str  # the file that holds the bytes on the master ...
    offset: int  # ... from this byte on
    converter: _Converter | None = None  # or: made by converting the weight `source`
    source: str = ""

    def read(self, start: int, size: int) -> bytes:
        if self.converter is not None:
            return self.converter.entries(self.source)[self.name][start : start + size]
        with open(self.path, "rb") as file:
            file.seek(self.offset + start)
            chunk = file.read(size)
        if len(chunk) != size:
            raise ModelFolderError(f"{self.path}: ended inside {self.name!r}; is it truncated?")
        return chunk

    def offer(self, request_id: int, model: str) -> PushOffer:
        return PushOffer(
            id=request_id,
            model=model,
            kind=self.kind,
            name=self.name,
            dtype=self.dtype,
            shape=self.shape,
            nbytes=self.nbytes,
            sha256=self.sha256,
        )


def sha256_range(
    path: Path | str, offset: int, nbytes: int, on_read: Callable[[int], object] = lambda n: None
) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        file.seek(offset)
        left = nbytes
        while left:
            chunk = file.read(min(left, HASH_BLOCK))
            if not chunk:
                raise ModelFolderError(f"{path}: ended early while hashing; is it truncated?")
            digest.update(chunk)
            on_read(len(chunk))
            left -= len(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelManifest:
    """Every stored tensor and pushable file of a model, hashed; built once per file state.
    `folder` is the model folder (for a GGUF file, its config-and-tokenizer folder)."""

    folder: Path
    tensors: dict[str, PushItem]
    files: dict[str, PushItem]
    gguf: Path | None = None  # the GGUF file the tensors are in, if any

    @property
    def fingerprint(self) -> str:
        """32 hex digits over every tensor's and file's name and sha256: the model's content."""
        digest = hashlib.sha256(b"cake-model-content-v1\n")
        for item in sorted([*self.tensors.values(), *self.files.values()], key=_item_key):
            line = f"{item.kind} {item.name} {item.dtype} {list(item.shape)} {item.sha256}\n"
            digest.update(line.encode())
        return digest.hexdigest()[:32]

    @classmethod
    def for_folder(cls, folder: str | os.PathLike) -> ModelManifest:
        """Read the cached manifest for this model's current files, or hash and cache it."""
        folder = Path(folder)
        gguf = gguf_file_of(folder)
        stored = _stored_tensors(folder, gguf)
        small = [folder / name for name in PUSH_FILES if (folder / name).is_file()]
        sources = sorted({Path(path) for _, _, path, _, _ in stored.values()} | set(small))
        stamp = hashlib.sha256(str(folder.resolve()).encode())
        for path in sources:
            stat = path.stat()
            stamp.update(f"|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        cached = cache_root() / "manifests" / f"{stamp.hexdigest()[:24]}.json"
        hashes = _read_json(cached, MANIFEST_VERSION)
        missing = sum(entry[4] for name, entry in stored.items() if f"tensor:{name}" not in hashes)
        tensors: dict[str, PushItem] = {}
        with progress_bar(missing or None, "hashing the model", unit="B") as bar:
            if missing:
                log.info(
                    "hashing %s (%s) once, so workers can cache what they receive",
                    gguf or folder,
                    format_size(missing),
                )
            for name, (dtype, shape, path, offset, nbytes) in stored.items():
                key = f"tensor:{name}"
                if key not in hashes:
                    hashes[key] = sha256_range(path, offset, nbytes, bar.update)
                tensors[name] = PushItem(
                    "tensor", name, dtype, shape, nbytes, hashes[key], path, offset
                )
        files: dict[str, PushItem] = {}
        for path in small:
            size = path.stat().st_size
            key = f"file:{path.name}"
            if key not in hashes:
                hashes[key] = sha256_range(path, 0, size)
            files[path.name] = PushItem("file", path.name, "", (), size, hashes[key], str(path), 0)
        if "config.json" not in files:
            raise ModelFolderError(f"{folder}: no config.json")
        _write_json(cached, MANIFEST_VERSION, hashes)
        return cls(folder, tensors, files, gguf)


# name -> (dtype, shape, file, offset, nbytes) of each stored tensor; a GGUF tensor's dtype is
# its GGUF type ("Q4_0"), which only the fingerprint and Payload.scheme read.
StoredTensors = dict[str, tuple[str, tuple[int, ...], str, int, int]]


def _stored_tensors(folder: Path, gguf: Path | None) -> StoredTensors:
    if gguf is not None:
        config = LlamaConfig.from_folder(folder)
        entries = GGUFCheckpoint(gguf, config.n_heads, config.n_kv_heads).entries
        return {
            name: (kind, shape, str(gguf), offset, nbytes)
            for name, (kind, shape, offset, nbytes) in entries.items()
        }
    from cake.model.checkpoint import Checkpoint
    from cake.split import read_header

    stored: StoredTensors = {}
    checkpoint = Checkpoint(folder)
    for file in checkpoint.files:
        for name, tensor in read_header(checkpoint.path(file)).items():
            stored[name] = (
                tensor.dtype,
                tensor.shape,
                str(tensor.file),
                tensor.offset,
                tensor.nbytes,
            )
    return stored


def _item_key(item: PushItem) -> tuple[str, str]:
    return item.kind, item.name


def _read_json(path: Path, version: int) -> dict:
    """The `data` of a cache file written by _write_json, or {} when absent or unreadable."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("version") == version and isinstance(stored.get("sha256"), dict):
            return dict(stored["sha256"])
    except (OSError, ValueError, AttributeError):
        pass  # absent or unreadable: hash again
    return {}


def _write_json(path: Path, version: int, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        temporary.write_text(json.dumps({"version": version, "sha256": data}), encoding="utf-8")
        os.replace(temporary, path)
    except OSError as exc:  # a read-only cache only costs hashing again next time
        log.warning("cannot cache hashes in %s (%s)", path, exc)


def block_tensor_names(config: LlamaConfig, blocks: Sequence[int]) -> list[str]:
    """The checkpoint names of `blocks`' tensors."""
    from cake.model.layout import checkpoint_shapes

    return list(checkpoint_shapes(config, blocks, with_embedding=False, with_head=False))


# --------------------------------------------------------------------------------------------
# Converted payloads


class _Converter:
    """Turns checkpoint weights into the safetensors entries a worker stores, one weight at a
    time. The last weight's entries are kept: they are offered and sent one after another."""

    def __init__(self, folder: Path, config: LlamaConfig, quantization: Quantization | None):
        self.checkpoint = open_checkpoint(folder, config)
        self.quantization = quantization
        self._lock = threading.Lock()
        self._last: tuple[str, dict[str, bytes]] | None = None

    def entries(self, name: str) -> dict[str, bytes]:
        """entry name -> bytes of the weight `name`, converted (the last one is kept)."""
        with self._lock:
            if self._last is None or self._last[0] != name:
                converted = self._convert(name)
                self._last = (name, {key: _raw_bytes(t) for key, t in converted.items()})
            return self._last[1]

    def described(self, name: str) -> dict[str, tuple[str, tuple[int, ...], int, str]]:
        """entry name -> (dtype, shape, nbytes, sha256) of the weight `name`, converted."""
        described = {}
        for key, tensor in self._convert(name).items():
            data = _raw_bytes(tensor)
            dtype = SAFETENSORS_DTYPES[tensor.dtype]
            described[key] = (dtype, tuple(tensor.shape), len(data), _sha256(data))
        return described

    def _convert(self, name: str) -> dict[str, torch.Tensor]:
        from cake.model.transcode import flatten, stored_form

        return flatten(name, stored_form(self.checkpoint, name, self.quantization))


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's little-endian bytes in row-major order (as safetensors stores them)."""
    return tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_hash_lock = threading.Lock()  # one writer of converted hashes at a time (workers push at once)


@dataclass
class Payload:
    """What the workers of one run receive: the model's manifest, in the form they will run."""

    manifest: ModelManifest
    config: LlamaConfig
    quantization: Quantization | None = None

    @property
    def converted(self) -> bool:
        return self.quantization is not None or self.manifest.gguf is not None

    @property
    def model(self) -> str:
        """The cache key of what travels: the content fingerprint, extended by the conversion
        (a worker keeps each form of a model in a folder of its own)."""
        fingerprint = self.manifest.fingerprint
        if not self.converted:
            return fingerprint
        scheme = (
            f"{self.quantization.scheme}/{self.quantization.group_size}"
            if self.quantization
            else "as-stored"
        )
        text = f"{fingerprint}|cake-conversion-v{CONVERSION_VERSION}|{scheme}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    @property
    def scheme(self) -> str:
        """The quantization most of a block's linear weights arrive in ("" for float): what the
        workers are asked to time a block in."""
        if self.manifest.gguf is None:
            return self.quantization.scheme if self.quantization else ""
        sizes: dict[str, int] = {}
        for name in block_tensor_names(self.config, [0]):
            item = self.manifest.tensors.get(name)
            if item is None or len(item.shape) != 2:
                continue
            if item.dtype in INT4_TYPES:
                kind = "int4"
            elif item.dtype not in FLOAT_TYPES:
                kind = "int8"
            else:
                kind = self.quantization.scheme if self.quantization else ""
            sizes[kind] = sizes.get(kind, 0) + item.shape[0] * item.shape[1]
        return max(sizes, key=lambda kind: sizes[kind]) if sizes else ""

    def items(self, blocks: Sequence[int]) -> list[PushItem]:
        """Everything a worker that serves `blocks` receives: the tensors of those blocks, then
        the config and tokenizer files. Nothing else. (Converts to hash on a first push.)"""
        names = block_tensor_names(self.config, blocks)
        for name in names:
            if name not in self.manifest.tensors:
                source = self.manifest.gguf or self.manifest.folder
                raise ModelFolderError(
                    f"tensor {name!r} is not in the checkpoint {source}; it is incomplete or not "
                    "this config's model"
                )
        tensors = (
            self._converted(names)
            if self.converted
            else [self.manifest.tensors[name] for name in names]
        )
        return tensors + list(self.manifest.files.values())

    def _converted(self, names: list[str]) -> list[PushItem]:
        converter = _Converter(self.manifest.folder, self.config, self.quantization)
        cached = cache_root() / "manifests" / f"converted-{self.model}.json"
        version = _conversion_cache_version()
        with _hash_lock:
            known = _read_json(cached, version)
        missing = [name for name in names if not _described_entries(known.get(name))]
        if missing:
            log.info(
                "converting %d weights once to hash them (%s), so workers can cache them",
                len(missing),
                self.quantization.scheme if self.quantization else "as loaded from GGUF",
            )
            with progress_bar(len(missing), "converting for the push", unit="weight") as bar:
                for name in missing:
                    known[name] = {
                        key: [dtype, list(shape), nbytes, sha]
                        for key, (dtype, shape, nbytes, sha) in converter.described(name).items()
                    }
                    bar.update(1)
            with _hash_lock:
                merged = _read_json(cached, version)
                merged.update(known)
                _write_json(cached, version, merged)
        items = []
        for name in names:
            for key, (dtype, shape, nbytes, sha) in known[name].items():
                items.append(
                    PushItem(
                        "tensor",
                        key,
                        dtype,
                        tuple(shape),
                        nbytes,
                        sha,
                        "",
                        0,
                        converter=converter,
                        source=name,
                    )
                )
        return items


def _described_entries(value: object) -> bool:
    """A cached description of a converted weight: {entry: [dtype, shape, nbytes, sha256]}."""
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(v, list) and len(v) == 4 for v in value.values())
    )


def _conversion_cache_version() -> int:
    """Converted hashes hold for one torch release (its quantization numerics): the cache
    file's version mixes CONVERSION_VERSION with it."""
    digest = hashlib.sha256(f"{CONVERSION_VERSION}|{torch.__version__}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


__all__ = ["ModelManifest", "Payload", "PushItem", "block_tensor_names"]
