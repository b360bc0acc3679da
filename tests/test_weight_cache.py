"""The packed-weight cache (cake/model/weight_cache): a GGUF's weights packed once, mapped after.

Each test loads a tiny Q4_0 GGUF into a fresh cache and holds the cached load to the uncached
one: the same logits bit for bit, and no quantized tensor read from the GGUF on a hit. A miss
(another kernel, another torch), a corrupt entry and a full disk all fall back to packing from
the GGUF, which is what an uncached load does.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from gguf_files import write_gguf
from helpers import run_cli

from cake.host import memory
from cake.model import weight_cache
from cake.model.gguf.checkpoint import GGUFCheckpoint
from cake.model.kernels import probe
from cake.model.opener import open_model
from cake.model.weight_cache import entry, parts, store

TOKENS = torch.tensor([[1, 7, 42, 99, 3, 250, 17, 64]])


@pytest.fixture(scope="module")
def gguf(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weight_cache") / "tiny-q4_0.gguf"
    write_gguf(tiny_llama, path, "Q4_0")
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh, empty cache folder with the packed-weight cache on; the `dense` kernels (they
    run everywhere, so the tests do not depend on this machine's AVX2)."""
    monkeypatch.setenv("CAKE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CAKE_NO_WEIGHT_CACHE")
    monkeypatch.setattr(memory, "_mapped_weights", 0)  # this test's maps only, undone after it
    weight_cache.configure()
    probe.use("dense")
    yield tmp_path / "cache" / "weights"
    probe.use(probe.AUTO)
    weight_cache.configure(enabled=False)  # the session's setting (conftest.no_weight_cache)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the tensors loads read from the GGUF file, in order."""
    names: list[str] = []
    load = GGUFCheckpoint.load

    def counted(self: GGUFCheckpoint, wanted: list[str], *args: object, **kwargs: object) -> dict:
        wanted = list(wanted)
        names.extend(wanted)
        return load(self, wanted, *args, **kwargs)

    monkeypatch.setattr(GGUFCheckpoint, "load", counted)
    return names


def logits(path: Path) -> torch.Tensor:
    """The whole model's logits at every position of TOKENS, loaded as cake-cli loads it."""
    model = open_model(path)
    part = model.load(model.compute("cpu"), range(model.config.n_layers), with_ends=True)
    weight_cache.flush()  # the entries this load handed to the writer thread are written
    with torch.inference_mode():
        hidden = part.run_blocks(part.embed(TOKENS), 0, part.new_cache(16), part.blocks)
        return part.head(hidden)[0].float()


def packed_reads(names: list[str]) -> list[str]:
    """The projection weights among `names` (the rest, norms and the embedding table, are read
    from the GGUF on every load)."""
    return [n for n in names if n.endswith("_proj.weight") or n == "lm_head.weight"]


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/*.safetensors"))


def test_second_load_maps_what_the_first_packed(gguf: Path, cache: Path, reads: list[str]):
    first = logits(gguf)
    written = entries(cache)
    assert [p.name.split("-")[0] for p in written] == ["block"] * 4 + ["head"]
    assert len(packed_reads(reads)) == 4 * 7 + 1  # q, k, v, o, gate, up, down per block; the head
    reads.clear()
    second = logits(gguf)
    assert packed_reads(reads) == []
    assert torch.equal(first, second)
    weight_cache.configure(enabled=False)
    assert torch.equal(first, logits(gguf))  # uncached: the same


def test_cached_tensors_are_views_of_the_mapped_entry(gguf: Path, cache: Path):
    logits(gguf)
    model = open_model(gguf)
    part = model.load(model.compute("cpu"), [0])
    down = part.model.layers["0"].mlp.down
    weight = down.packed_values()["weight"]
    path = next(p for p in entries(cache) if p.name.startswith("block-0000"))
    maps = Path("/proc/self/maps").read_text().splitlines()
    spans = [[int(x, 16) for x in line.split()[0].split("-")] for line in maps if str(path) in line]
    assert any(start <= weight.data_ptr() < end for start, end in spans), "a copy, not a map"


def test_a_corrupt_entry_is_rebuilt_never_used(
    gguf: Path, cache: Path, reads: list[str], caplog: pytest.LogCaptureFixture
):
    first = logits(gguf)
    block0, block1, *_ = entries(cache)
    data = bytearray(block0.read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit in the tensors' bytes
    block0.write_bytes(bytes(data))
    with open(block1, "r+b") as file:
        file.truncate(block1.stat().st_size // 2)  # a partial entry
    reads.clear()
    with caplog.at_level(logging.WARNING, "cake.weight_cache"):
        second = logits(gguf)
    assert caplog.text.count("is corrupt") == 2
    assert sorted({n.split(".")[2] for n in packed_reads(reads)}) == ["0", "1"]
    assert torch.equal(first, second)
    reads.clear()
    assert torch.equal(first, logits(gguf))  # rebuilt whole: all hits now
    assert packed_reads(reads) == []


def test_another_kernel_layout_packs_anew(
    gguf: Path, cache: Path, reads: list[str], monkeypatch: pytest.MonkeyPatch
):
    dense = logits(gguf)
    probe.use("torch")
    reads.clear()
    torch_kernels = logits(gguf)  # another --kernels: another entry
    assert len(packed_reads(reads)) == 29
    assert len(entries(cache)) == 10
    # Under one key (as when the measured choice changes), the recorded layout decides.
    monkeypatch.setattr(parts, "entry_key", lambda device, quantization: "one-key")
    logits(gguf)
    probe.use("dense")
    reads.clear()
    assert torch.equal(logits(gguf), dense)
    assert len(packed_reads(reads)) == 29  # the entry held torch's layout: packed anew
    assert not torch.equal(dense, torch_kernels)


def test_another_torch_version_misses(
    gguf: Path, cache: Path, reads: list[str], monkeypatch: pytest.MonkeyPatch
):
    first = logits(gguf)
    monkeypatch.setattr(torch, "__version__", "2.99.0+other")
    reads.clear()
    assert torch.equal(first, logits(gguf))
    assert len(packed_reads(reads)) == 29
    assert len(entries(cache)) == 10  # both versions' entries, each under its own key


def test_a_full_disk_warns_once_and_loads_without_the_cache(
    gguf: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    weight_cache.configure(enabled=False)
    uncached = logits(gguf)
    weight_cache.configure()

    def full_disk(path: Path, mode: str = "r") -> object:
        """The partial file is created, then the disk is full."""
        file = open(path, mode)  # noqa: SIM115 (closed before the failure)
        if "w" in mode:
            file.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return file

    monkeypatch.setattr(entry, "open", full_disk, raising=False)
    with caplog.at_level(logging.WARNING, "cake.weight_cache"):
        assert torch.equal(logits(gguf), uncached)
    assert caplog.text.count("stops writing") == 1
    assert "No space left on device" in caplog.text
    assert list(cache.glob("*/*")) == [p for p in cache.glob("*/source.txt")]  # nothing partial


def test_least_recently_used_entries_go_first(gguf: Path, cache: Path, tmp_path: Path):
    logits(gguf)
    first_size = sum(p.stat().st_size for p in entries(cache))
    other = tmp_path / "copy.gguf"
    shutil.copyfile(gguf, other)  # a new mtime: another source
    os.utime(other, ns=(1, 1))
    weight_cache.configure(max_bytes=first_size + first_size // 2)
    logits(other)
    kept = {p.parent for p in entries(cache)}
    assert len(kept) == 1 and (next(iter(kept)) / "source.txt").read_text().strip().endswith(
        "copy.gguf"
    )


def test_a_bound_smaller_than_the_model_warns_once_and_keeps_nothing_more(
    gguf: Path, cache: Path, caplog: pytest.LogCaptureFixture
):
    weight_cache.configure(max_bytes=1)
    with caplog.at_level(logging.WARNING, "cake.weight_cache"):
        first = logits(gguf)
    assert caplog.text.count("exceed the cache's bound") == 1
    assert len(entries(cache)) == 1  # the first entry written; none after the warning
    assert torch.equal(first, logits(gguf))


def test_mapped_weights_are_not_counted_as_free_memory(
    gguf: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
):
    """The mapped entries are page cache, which the system reports as available: a KV budget
    taken from that would push the weights out."""
    monkeypatch.setattr(memory, "_system_memory", lambda: memory.DeviceMemory(8 << 30, 16 << 30))
    logits(gguf)  # packs: nothing mapped
    assert memory.device_memory(torch.device("cpu")).free == 8 << 30
    logits(gguf)
    mapped = sum(len(e.read_bytes()) for e in entries(cache))
    free = memory.device_memory(torch.device("cpu")).free
    assert 8 << 30 > free > (8 << 30) - mapped  # less the tensors' bytes (not the headers)


def test_partial_files_of_killed_writers_are_removed(gguf: Path, cache: Path):
    logits(gguf)
    folder = next(cache.iterdir())
    stale, live = (folder / f".block-0000-x.safetensors.{pid}.partial" for pid in (1, 2))
    for partial in (stale, live):
        partial.write_bytes(b"half an entry")
    os.utime(stale, (1, 1))  # untouched for long: its writer is gone
    store.evict(set())
    assert not stale.exists() and live.exists()
    assert len(entries(cache)) == 5


def test_no_weight_cache_and_cache_info(gguf: Path, cache: Path):
    result = run_cli("--no-weight-cache", "--weight-cache-size", "3G", "--cache-info")
    assert result.exit_code == 0, result.stderr
    probe.use("dense")  # the CLI chose its own kernels: this test's again
    assert "of at most 3.0 GiB, off (--no-weight-cache)" in result.stdout
    logits(gguf)  # configured off by the CLI: nothing kept
    assert entries(cache) == []
    weight_cache.configure()
    logits(gguf)
    info = run_cli("--cache-info").stdout
    assert f"cache folder: {cache.parent}" in info
    assert "5 entries" in info and str(gguf) in info
    assert "removed" in run_cli("--clear-weight-cache").stdout
    assert entries(cache) == []


@pytest.mark.slow
def test_cli_answers_the_same_from_the_cache(smollm2_gguf: Path, tmp_path: Path):
    """Two `cake-cli` processes on the demo model, its blocks converted (--no-mmap: else they
    run where they lie in the file, with nothing to cache): the second maps every projection
    from the cache and writes the same text."""
    env = {**os.environ, "CAKE_CACHE_DIR": str(tmp_path), "CAKE_NO_MMAP": "1"}
    env.pop("CAKE_NO_WEIGHT_CACHE")
    command = [sys.executable, "-m", "cake.cli", "--model", str(smollm2_gguf), "--prompt"]
    command += ["What is the capital of France?", "-n", "8", "--temperature", "0"]
    runs = [subprocess.run(command, env=env, capture_output=True, text=True) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout
    assert " 0 projections mapped" in runs[0].stderr
    assert " 0 packed" in runs[1].stderr
