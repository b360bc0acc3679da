"""The worker's push cache, in process: resume offsets, checksums, names that never become paths."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from helpers import build_random_llama
from safetensors import safe_open

from cake.config import LlamaConfig
from cake.protocol import PushChunk, PushOffer
from cake.push import CacheError, ModelCache, ModelManifest, payload_model, worker_payload

MODEL = "cd" * 16


def _offer(data: bytes, name: str = "model.layers.0.mlp.up_proj.weight", **kw: object) -> PushOffer:
    fields: dict = {
        "id": 1,
        "model": MODEL,
        "kind": "tensor",
        "name": name,
        "dtype": "U8",
        "shape": [len(data)],
        "nbytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return PushOffer(**{**fields, **kw})


def test_partial_push_resumes_where_the_data_ends(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    offer = _offer(data)
    cache = ModelCache(tmp_path)
    assert cache.offer(1, offer) == 0
    assert not cache.write(1, PushChunk(id=1, offset=0, data=data[:3000]))
    # The connection (or the whole worker) goes away; a fresh cache sees what is on disk.
    cache.forget(1)
    fresh = ModelCache(tmp_path)
    assert fresh.offer(2, offer) == 3000
    with pytest.raises(CacheError, match="expected 3000"):
        fresh.write(2, PushChunk(id=1, offset=0, data=data[:10]))
    assert fresh.write(2, PushChunk(id=1, offset=3000, data=data[3000:]))
    assert fresh.offer(3, offer) == len(data)  # complete: nothing to send
    folder = tmp_path / MODEL
    (path,) = folder.glob("t-*.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert torch.equal(
            f.get_tensor(offer.name), torch.frombuffer(bytearray(data), dtype=torch.uint8)
        )


def test_corrupt_data_is_refused_and_dropped(tmp_path: Path) -> None:
    data = b"\x01" * 100
    offer = _offer(data, sha256=hashlib.sha256(b"other").hexdigest())
    cache = ModelCache(tmp_path)
    cache.offer(1, offer)
    with pytest.raises(CacheError, match="sha256 mismatch") as caught:
        cache.write(1, PushChunk(id=1, offset=0, data=data))
    assert caught.value.code == "bad_checksum"
    assert list((tmp_path / MODEL).iterdir()) == []  # nothing half-trusted stays


def test_wire_names_never_become_paths(tmp_path: Path) -> None:
    data = b"{}"
    cache = ModelCache(tmp_path / "cache")
    offer = _offer(data, kind="file", name="config.json", dtype="", shape=[])
    cache.offer(1, offer)
    assert cache.write(1, PushChunk(id=1, offset=0, data=data))
    tensor = _offer(b"\x00" * 4, name="model.layers.0.weird..name")
    cache.offer(1, tensor)
    cache.write(1, PushChunk(id=1, offset=0, data=b"\x00" * 4))
    names = sorted(p.name for p in (tmp_path / "cache" / MODEL).iterdir())
    digest = hashlib.sha256(tensor.name.encode()).hexdigest()[:32]
    assert names == ["config.json", "model.safetensors.index.json", f"t-{digest}.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_another_connection_cannot_write_into_a_push_in_progress(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    offer = _offer(b"\x02" * 50)
    cache.offer(1, offer)
    with pytest.raises(CacheError) as caught:
        cache.offer(2, offer)
    assert caught.value.code == "busy"
    with pytest.raises(CacheError, match="not offered"):
        cache.write(2, PushChunk(id=1, offset=0, data=b"\x02"))


def test_payload_is_the_blocks_tensors_and_the_small_files(tmp_path: Path) -> None:
    folder = build_random_llama(tmp_path / "m", n_layers=3, shard=True)
    manifest = ModelManifest.for_folder(folder)
    config = LlamaConfig.from_folder(folder)
    items = worker_payload(manifest, config, [1])
    tensors = {item.name for item in items if item.kind == "tensor"}
    assert tensors and all(name.startswith("model.layers.1.") for name in tensors)
    assert len(tensors) == 9
    assert "config.json" in {item.name for item in items if item.kind == "file"}
    # Cached: the second look hashes nothing and agrees; the fingerprint follows the bytes.
    again = ModelManifest.for_folder(folder)
    assert payload_model(again) == payload_model(manifest)
    other = ModelManifest.for_folder(build_random_llama(tmp_path / "o", n_layers=3, seed=5))
    assert other.fingerprint != manifest.fingerprint
    for item in items:
        assert hashlib.sha256(item.read(0, item.nbytes)).hexdigest() == item.sha256
