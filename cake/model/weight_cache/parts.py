"""A load's view of the packed-weight cache: one entry per block, one for the head.

The entry of a part is `<cache>/weights/<fingerprint>/<part>-<key>.safetensors`, where the key
hashes what else decides the packed bytes: this cache's FORMAT, torch's version (its int4
packing op has changed layout between releases), the device type, --quantize, --kernels and
the source of cake's own kernels. The kernel layout each projection was packed for is in the
entry's record and is checked against the kernels chosen now: a projection whose chosen kernel
reads another layout is packed anew, and the entry rewritten.

The entries a load will use are read and checked on a pool of threads as soon as the load names
its parts (`expect`: zlib's CRC releases the GIL, so a 4.5 GB model checks in about half the
time on 2 cores, while the first blocks are put together). A part takes its entry (mapped,
checked: entry.py), hands out its projections, packs the ones it lacks as the loader always
did, and when the part is done hands the entry to the process's writer thread if anything
changed. The load does not wait for the writes: the next block is converted while the last one
is written (file writes release the GIL too), and the first token is computed while the rest
are. The writer's thread is joined when the interpreter exits (`flush` waits for it sooner), so
a process ends with its entries whole. A failed write (a full disk) warns once and the process
goes on without the cache.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import torch
from torch import nn

from cake.host.memory import note_mapped_weights
from cake.model.kernels import native, probe
from cake.model.mapped_linear import is_mapped
from cake.model.quant import Quantization
from cake.model.weight_cache.entry import CorruptEntry, read_entry, write_entry
from cake.model.weight_cache.fingerprint import source_fingerprint
from cake.model.weight_cache.modules import module_of, record_of
from cake.model.weight_cache.store import (
    SOURCE_FILE,
    evict,
    settings,
    stop_writing,
    weights_folder,
)

log = logging.getLogger("cake.weight_cache")

FORMAT = 1  # bump when what an entry holds changes: older entries then miss
RECORDS_KEY = "cake.records"
CHECK_THREADS = 4  # threads that read and check entries at once (at most one per core)


_writes: list[Future] = []  # every entry write (and report) handed to the writer thread


@functools.cache
def _writer() -> ThreadPoolExecutor:
    """The process's one writer thread: entries are written one at a time, in order."""
    return ThreadPoolExecutor(1, thread_name_prefix="cake-weight-cache")


def flush() -> None:
    """Wait until every entry handed to the writer thread is written (or failed)."""
    while _writes:
        _writes.pop(0).result()


class WeightCache:
    """The entries of one source file under one key (see the module docstring); with
    `folder` None, a cache that keeps nothing (off, or a source it does not apply to)."""

    def __init__(
        self, folder: Path | None, key: str, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.folder, self.key, self.device, self.dtype = folder, key, device, dtype
        self.mapped = 0  # projections mapped from entries
        self.packed = 0  # projections packed from the source
        self.in_place = 0  # projections run where they lie in the source (mapped_linear.py)
        self.written = 0  # bytes written (by the writer thread)
        self.writing = 0  # entries handed to the writer thread
        self.in_use: set[Path] = set()
        self._checker: ThreadPoolExecutor | None = None
        self._checks: dict[Path, Future] = {}

    def path_of(self, label: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{label}-{self.key}.safetensors"

    def expect(self, labels: list[str]) -> None:
        """Start reading and checking the entries of these parts (see the module docstring)."""
        paths = [p for p in map(self.path_of, labels) if p is not None and p.is_file()]
        if not paths:
            return
        threads = min(len(paths), os.cpu_count() or 1, CHECK_THREADS)
        self._checker = ThreadPoolExecutor(threads, thread_name_prefix="cake-weight-check")
        self._checks = {path: self._checker.submit(read_entry, path) for path in paths}

    def entry(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """An entry's tensors and metadata, checked (read_entry's errors)."""
        check = self._checks.pop(path, None)
        return check.result() if check is not None else read_entry(path)

    def __enter__(self) -> WeightCache:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """The load is done (or failed): stop checking entries; log what the writer thread
        wrote once it has (it writes in order)."""
        if self._checker is not None:
            for check in self._checks.values():
                check.cancel()
            self._checker.shutdown(wait=True)
            self._checker, self._checks = None, {}
        if self.writing:
            _writes.append(_writer().submit(self._report_written, time.perf_counter()))

    def write(self, path: Path, tensors: dict[str, torch.Tensor], records: dict) -> None:
        """Write an entry on the writer thread (see the module docstring)."""
        self.writing += 1
        _writes.append(_writer().submit(self._write, path, tensors, records))

    def _write(self, path: Path, tensors: dict[str, torch.Tensor], records: dict) -> None:
        if not settings().writable:
            return
        try:
            size = write_entry(path, tensors, {RECORDS_KEY: json.dumps(records, sort_keys=True)})
        except OSError as error:  # a full disk, a read-only cache: run on without it
            stop_writing(f"cannot write {path}: {error}")
            return
        self.written += size
        self.in_use.add(path)
        evict(self.in_use)

    def _report_written(self, load_end: float) -> None:
        if self.written:
            log.info(
                "packed weights cached in %s: %.0f MiB (%.1f s after the load)",
                self.folder, self.written / 2**20, time.perf_counter() - load_end,
            )  # fmt: skip

    @contextlib.contextmanager
    def part(self, label: str) -> Iterator[CachedPart]:
        """The entry of one part (`block-0007`, `head`), written when the part is done."""
        part = CachedPart(self, self.path_of(label))
        yield part
        part.close()

    def summary(self) -> str | None:
        """One line for the load log; None when the cache took no part."""
        if self.folder is None or not (self.mapped or self.packed):
            return None
        line = f"packed weights: {self.mapped} projections mapped from {self.folder}"
        line += f", {self.packed} packed"
        if self.in_place:
            line += f" ({self.in_place} more run where they lie in the model file)"
        if self.writing:
            line += f" ({self.writing} {'entry' if self.writing == 1 else 'entries'} being "
            line += "written to the cache)"
        return line


class CachedPart:
    """One entry's projections: `projection` maps a kept one or builds (and keeps) a new one."""

    def __init__(self, cache: WeightCache, path: Path | None) -> None:
        self.cache, self.path = cache, path
        self.records: dict[str, dict] = {}  # by projection: what the entry holds
        self.tensors: dict[str, torch.Tensor] = {}
        self.changed = False
        if path is not None:
            self._read(path)

    def _read(self, path: Path) -> None:
        try:
            tensors, metadata = self.cache.entry(path)
            records = json.loads(metadata[RECORDS_KEY])
        except FileNotFoundError:
            return
        except (CorruptEntry, KeyError, ValueError) as error:
            log.warning("packed-weight cache entry %s is corrupt (%s): rebuilding it", path, error)
            path.unlink(missing_ok=True)
            return
        self.records, self.tensors = records, tensors
        self.cache.in_use.add(path)
        if self.cache.device.type == "cpu":  # run from the mapped pages (elsewhere: copied)
            note_mapped_weights(sum(t.numel() * t.element_size() for t in tensors.values()))

    def projection(self, names: list[str], build: Callable[[], nn.Module]) -> nn.Module:
        """The projection over the checkpoint tensors `names`: mapped from the entry when it
        holds it in the layout chosen now, else `build()` (and kept for the entry)."""
        key = "|".join(names)
        record = self.records.get(key)
        if record is not None:
            module = module_of(record, self.tensors, self.cache.device, self.cache.dtype)
            if module is not None:
                self.cache.mapped += 1
                return module
        module = build()
        if is_mapped(module):  # runs where it lies in the source file: nothing to keep
            self.cache.in_place += 1
            return module
        self.cache.packed += 1
        if self.path is None:
            return module
        self.records.pop(key, None)
        kept = record_of(module, names[0])
        if kept is not None:
            self.records[key] = kept[0]
            self.tensors.update(kept[1])
            self.changed = True
        return module

    def close(self) -> None:
        if self.path is None:
            return
        if not self.changed:
            if self.records:
                with contextlib.suppress(OSError):
                    os.utime(self.path)  # recently used: evicted last
            return
        if settings().writable:
            tensors = {name: self.tensors[name] for name in _tensor_names(self.records.values())}
            self.cache.write(self.path, tensors, self.records)


def _tensor_names(records: Iterable[dict]) -> list[str]:
    """The tensors `records` refer to (a concat's parts' too)."""
    found: list[str] = []
    for record in records:
        if record["kind"] == "concat":
            found += _tensor_names(record["parts"])
        else:
            found += record["tensors"].values()
    return found


def open_cache(
    source: Path | None,
    device: torch.device,
    dtype: torch.dtype,
    quantization: Quantization | None,
) -> WeightCache:
    """The cache for loading from `source` (a GGUF file; None: a source the cache does not
    apply to), or one that keeps nothing when it is off."""
    if source is None or not settings().enabled:
        return WeightCache(None, "", device, dtype)
    try:
        fingerprint = source_fingerprint(source)
    except OSError as error:
        log.warning("packed-weight cache off for %s: %s", source, error)
        return WeightCache(None, "", device, dtype)
    folder = weights_folder() / fingerprint
    _name_source(folder, source)
    return WeightCache(folder, entry_key(device, quantization), device, dtype)


def entry_key(device: torch.device, quantization: Quantization | None) -> str:
    """12 hex digits of what, besides the source, decides an entry's bytes."""
    kernels_source = "none"
    if native.unavailable_reason() is None:
        kernels_source = hashlib.sha256(native.SOURCE.read_bytes()).hexdigest()[:12]
    key = {
        "format": FORMAT,
        "torch": torch.__version__,
        "device": device.type,
        "quantize": [quantization.scheme, quantization.group_size] if quantization else None,
        "kernels": probe.named(),
        "kernels_source": kernels_source,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _name_source(folder: Path, source: Path) -> None:
    """source.txt: which file the folder's entries were made from (for --cache-info)."""
    named = folder / SOURCE_FILE
    if named.is_file() or not settings().writable:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        named.write_text(f"{source.resolve()}\n", encoding="utf-8")
    except OSError as error:
        stop_writing(f"cannot write {named}: {error}")
