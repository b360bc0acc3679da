"""`cake-split-model`: one self-contained model folder ("bundle") per worker, plus the master's.

A worker bundle holds the tensors of exactly that worker's blocks, config.json, the generation
config and tokenizer files, and a topology.yml with only that worker, so a worker machine needs
nothing else: `cake-cli --model OUT/w --mode worker --name w --topology OUT/w/topology.yml`.
The master bundle holds the embedding, the final norm, the head (nothing more when it is tied to
the embedding), the blocks no worker serves, and the full topology.

Tensors are copied byte for byte (same names, dtypes and bytes) from the source files into one
new safetensors file per bundle, in chunks: the header is computed from the source headers first,
then the data is streamed, so memory stays flat whatever the model or tensor size. We read the
source headers and data ourselves rather than through `safe_open`, whose memory map would count
every byte read so far in the process's resident set.

Every bundle is written into a staging folder inside the output folder and renamed into place
only once all of them are complete, so a failure leaves the output folder as it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cake.errors import ModelFolderError
from cake.host.progress import progress_bar
from cake.host.sizes import format_size
from cake.model.checkpoint import INDEX_FILE, MODEL_FILES, Checkpoint, head_source
from cake.model.config import LlamaConfig
from cake.model.gguf import ensure_tokenizer_files, gguf_file_of
from cake.model.layout import HEAD, checkpoint_shapes
from cake.model.opener import open_model
from cake.model.quant import Quantization
from cake.model.transcode import write_transcoded
from cake.topology import Topology, format_blocks, load_topology

log = logging.getLogger(__name__)

MASTER = "master"  # the master bundle's folder name
SHARD_FILE = "model-00001-of-00001.safetensors"
TOPOLOGY_FILE = "topology.yml"

# safetensors dtype -> bytes per element. Bundles order their tensors by element size (largest
# first), as safetensors itself does, so every tensor's data stays aligned to its element size.
ITEMSIZE = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
COPY_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class SourceTensor:
    """Where one tensor's bytes lie in the source checkpoint."""

    name: str
    file: Path
    dtype: str  # safetensors spelling: "BF16", "F32", ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


@dataclass(frozen=True)
class Bundle:
    name: str  # a worker's node name, or MASTER
    blocks: tuple[int, ...]
    tensors: tuple[SourceTensor, ...]
    topology_yaml: str

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def split_model(
    model_path: str | os.PathLike,
    topology: str | os.PathLike,
    output: str | os.PathLike,
    workers: Sequence[str] | None = None,
    force: bool = False,
    quantize: str | None = None,
) -> dict[str, Path]:
    """Write OUTPUT/<worker>/ for each worker (or only `workers`) and, without `workers`,
    OUTPUT/master/. Returns bundle name -> folder.

    Raises TopologyError for an unknown worker or a topology that does not fit the model,
    ModelFolderError for an unusable checkpoint, ValueError for a bundle that already exists
    (unless `force`).
    """
    topo = load_topology(topology)
    names = _bundle_names(topo, workers)
    output = Path(output)
    _refuse_existing(output, names, force)  # before a possibly long GGUF conversion
    opened = open_model(model_path)
    folder, config = opened.folder, opened.config
    topo.check_fits(config.n_layers)
    # A model named by its hub id: only the shards these bundles copy are fetched.
    opened.fetch(
        {block for name in names for block in _bundle_blocks(topo, config, name)},
        with_ends=MASTER in names,
    )
    quantization = Quantization(quantize) if quantize else None
    if gguf_file_of(folder):
        _convert_tokenizer(folder)
    if quantization or gguf_file_of(folder):
        # Tensors change form (quantized, or decoded from GGUF blocks): block by block.
        bundles = [
            Bundle(name, _bundle_blocks(topo, config, name), (), _bundle_yaml(topo, name))
            for name in names
        ]
        write_bundles(folder, bundles, output, force, (config, quantization))
    else:
        bundles = plan_bundles(folder, config, topo, names)
        write_bundles(folder, bundles, output, force)
    log.info("split %s into %d bundle(s) in %s", folder, len(bundles), output)
    return {bundle.name: output / bundle.name for bundle in bundles}


def _bundle_names(topo: Topology, workers: Sequence[str] | None) -> list[str]:
    """The bundles to write: the named workers, or every worker and the master."""
    if workers is None:
        names = [node.name for node in topo.nodes]
        if MASTER in names:
            raise ValueError(
                f"{topo.source}: a worker named {MASTER!r} would share the master bundle's "
                "folder; rename that node"
            )
        names.append(MASTER)
    else:
        names = list(dict.fromkeys(topo.node(name).name for name in workers))  # TopologyError
    for name in names:
        # Node names become folder names: a name must not reach outside the output folder.
        if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            raise ValueError(
                f"{topo.source}: node name {name!r} cannot be a folder name; rename the node"
            )
    return names


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _refuse_existing(output: Path, names: Sequence[str], force: bool) -> None:
    existing = [str(output / name) for name in names if _exists(output / name)]
    if existing and not force:
        raise ValueError(
            f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
            "pass --force to replace, or choose another --output"
        )


def plan_bundles(
    folder: Path, config: LlamaConfig, topo: Topology, names: Sequence[str]
) -> list[Bundle]:
    """What each bundle holds, checked against the checkpoint before anything is written."""
    checkpoint = Checkpoint(folder)
    headers: dict[str, dict[str, SourceTensor]] = {}

    def source(name: str, needed_by: str) -> SourceTensor:
        file = checkpoint.file_of.get(name)
        if file is None:
            listing = checkpoint.folder / _listing_file(checkpoint)
            raise ModelFolderError(
                f"tensor {name!r} (needed by {needed_by}) is not in the checkpoint: {listing} "
                "does not list it; the checkpoint is incomplete or not this config's model"
            )
        if file not in headers:
            headers[file] = read_header(checkpoint.path(file))
        tensor = headers[file].get(name)
        if tensor is None:
            raise ModelFolderError(
                f"tensor {name!r} (needed by {needed_by}) is missing from {folder / file}, "
                f"though {folder / _listing_file(checkpoint)} says it is there"
            )
        return tensor

    bundles = []
    for name in names:
        is_master = name == MASTER
        blocks = _bundle_blocks(topo, config, name)
        needed_by = "the master" if is_master else f"worker {name!r}"
        shapes = tensor_shapes(config, checkpoint, blocks, is_master)
        tensors = tuple(source(tensor, needed_by) for tensor in shapes)
        for tensor in tensors:
            if tensor.shape != shapes[tensor.name]:
                raise ModelFolderError(
                    f"tensor {tensor.name!r} in {tensor.file} has shape {tensor.shape}, but "
                    f"{folder / 'config.json'} implies {shapes[tensor.name]}"
                )
        bundles.append(Bundle(name, blocks, tensors, _bundle_yaml(topo, name)))
    return bundles


def _bundle_blocks(topo: Topology, config: LlamaConfig, name: str) -> tuple[int, ...]:
    if name == MASTER:
        return tuple(topo.master_blocks(config.n_layers))
    return tuple(topo.node(name).blocks)


def _bundle_yaml(topo: Topology, name: str) -> str:
    return topo.to_yaml() if name == MASTER else topo.to_yaml([name])


def _listing_file(checkpoint: Checkpoint) -> str:
    """The file that says which tensors the checkpoint has: the index, or the safetensors."""
    if (checkpoint.folder / INDEX_FILE).is_file():
        return INDEX_FILE
    return ", ".join(checkpoint.files)


def tensor_shapes(
    config: LlamaConfig, checkpoint: Checkpoint, blocks: Sequence[int], is_master: bool
) -> dict[str, tuple[int, ...]]:
    """Stored tensor name -> shape, for the part of the model that holds `blocks` (and, for the
    master, the embedding, final norm and head). A tied head is read from the embedding
    (weights.head_source), so it is not stored twice."""
    shapes = checkpoint_shapes(config, blocks, is_master, is_master)
    if is_master and head_source(config, checkpoint) != HEAD:
        del shapes[HEAD]
    return shapes


def read_header(path: Path) -> dict[str, SourceTensor]:
    """The tensors of one safetensors file, with their absolute data offsets; no data read."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            prefix = file.read(8)
            if len(prefix) < 8:
                raise ModelFolderError(f"{path}: too short for a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise ModelFolderError(f"{path}: bad safetensors header length {length}")
            header = json.loads(file.read(length))
    except OSError as exc:
        raise ModelFolderError(f"{path}: cannot read it ({exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{path}: not a safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise ModelFolderError(f"{path}: not a safetensors file (the header is not a map)")
    data_start = 8 + length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = str(entry["dtype"]), tuple(int(n) for n in entry["shape"])
            start, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelFolderError(f"{path}: bad header entry for {name!r}: {entry!r}") from None
        if not 0 <= start <= end or data_start + end > size:
            raise ModelFolderError(
                f"{path}: tensor {name!r} lies at bytes {start}-{end} of the data, past the end "
                "of the file; the file is truncated or corrupt"
            )
        itemsize = ITEMSIZE.get(dtype)
        if itemsize is not None and math.prod(shape) * itemsize != end - start:
            raise ModelFolderError(
                f"{path}: tensor {name!r} ({dtype}, shape {shape}) should take "
                f"{math.prod(shape) * itemsize} bytes, but its header gives {end - start}"
            )
        tensors[name] = SourceTensor(name, path, dtype, shape, data_start + start, end - start)
    return tensors


def write_bundles(
    folder: Path,
    bundles: Sequence[Bundle],
    output: Path,
    force: bool = False,
    transcode: tuple[LlamaConfig, Quantization | None] | None = None,
) -> None:
    """Write every bundle into a staging folder, then move them all into `output`.

    transcode: (config, quantization) to write tensors in a new form (cake.model.transcode)
    instead of copying their bytes."""
    _refuse_existing(output, [bundle.name for bundle in bundles], force)
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".cake-split-", dir=output))
    try:
        total = sum(bundle.nbytes for bundle in bundles)
        with progress_bar(total, "splitting", unit="B") as progress:
            for bundle in bundles:
                _write_bundle(folder, bundle, staging / bundle.name, progress.update, transcode)
        _refuse_existing(output, [bundle.name for bundle in bundles], force)  # appeared meanwhile?
        for bundle in bundles:
            target = output / bundle.name
            if _exists(target):  # --force: move the old one aside, deleted with the staging
                os.replace(target, staging / f".replaced-{bundle.name}")
            os.replace(staging / bundle.name, target)
            log.info(
                "wrote %s: %s (%s)",
                target,
                "master" if bundle.name == MASTER else f"worker {bundle.name}",
                _describe(bundle, _tensor_bytes(target)),
            )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _tensor_bytes(bundle_folder: Path) -> int:
    index = json.loads((bundle_folder / INDEX_FILE).read_text(encoding="utf-8"))
    return int(index["metadata"]["total_size"])


def _describe(bundle: Bundle, nbytes: int) -> str:
    size = format_size(nbytes)
    if not bundle.blocks:
        return f"no blocks, {size}"
    return f"block{'s' if len(bundle.blocks) > 1 else ''} {format_blocks(bundle.blocks)}, {size}"


def _write_bundle(
    folder: Path,
    bundle: Bundle,
    target: Path,
    progress: Callable[[int], object],
    transcode: tuple[LlamaConfig, Quantization | None] | None = None,
) -> None:
    target.mkdir()
    if transcode is not None:
        config, quantization = transcode
        is_master = bundle.name == MASTER
        write_transcoded(folder, config, quantization, bundle.blocks, is_master, target, progress)
    else:
        weight_map = write_safetensors(target / SHARD_FILE, bundle.tensors, progress)
        index = {
            "metadata": {"total_size": bundle.nbytes},
            "weight_map": dict.fromkeys(sorted(weight_map), SHARD_FILE),
        }
        (target / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    for name in MODEL_FILES:  # those the source has; config.json always
        if (folder / name).is_file():
            shutil.copyfile(folder / name, target / name)
    (target / TOPOLOGY_FILE).write_text(bundle.topology_yaml, encoding="utf-8")


def _convert_tokenizer(folder: Path) -> None:
    """A GGUF's tokenizer files, converted into its metadata folder when a process first needs
    them (the bundles copy them; a master bundle needs them). A file without a tokenizer still
    splits: its bundles serve workers."""
    try:
        ensure_tokenizer_files(folder)
    except ModelFolderError as error:
        log.warning("%s: the bundles get no tokenizer", error)


def write_safetensors(
    path: Path,
    tensors: Sequence[SourceTensor],
    progress: Callable[[int], object] = lambda count: None,
) -> list[str]:
    """Copy `tensors` byte for byte into a new safetensors file; returns the names written.

    The header is computed from the source headers alone; the data then streams through one
    reused buffer, so memory does not grow with the tensors.
    """
    ordered = sorted(tensors, key=lambda t: (-ITEMSIZE.get(t.dtype, 1), t.name))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in ordered:
        header[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    buffer = memoryview(bytearray(COPY_CHUNK_BYTES))
    with contextlib.ExitStack() as stack, open(path, "wb") as out:
        sources: dict[Path, BinaryIO] = {}
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for tensor in ordered:
            if tensor.file not in sources:
                sources[tensor.file] = stack.enter_context(open(tensor.file, "rb"))
            _copy_range(sources[tensor.file], out, tensor, buffer, progress)
    return [tensor.name for tensor in ordered]


def _copy_range(
    source: BinaryIO,
    out: BinaryIO,
    tensor: SourceTensor,
    buffer: memoryview,
    progress: Callable[[int], object],
) -> None:
    source.seek(tensor.offset)
    remaining = tensor.nbytes
    while remaining:
        count = source.readinto(buffer[: min(remaining, len(buffer))])
        if not count:
            raise ModelFolderError(
                f"{tensor.file}: ended in the middle of tensor {tensor.name!r}; the file is "
                "truncated"
            )
        out.write(buffer[:count])
        remaining -= count
        progress(count)
