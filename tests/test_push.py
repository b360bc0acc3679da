"""The worker's push cache, in process: resume offsets, checksums, names that never become paths."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from helpers import build_random_llama
from safetensors import safe_open

from cake.cluster.payload import ModelManifest, Payload
from cake.cluster.push import ModelCache
from cake.errors import CakeError, Code
from cake.model.config import LlamaConfig
from cake.wire.protocol import PushChunk, PushOffer

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
    with pytest.raises(CakeError, match="expected 3000"):
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
    with pytest.raises(CakeError, match="sha256 mismatch") as caught:
        cache.write(1, PushChunk(id=1, offset=0, data=data))
    assert caught.value.code is Code.BAD_CHECKSUM
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
    with pytest.raises(CakeError) as caught:
        cache.offer(2, offer)
    assert caught.value.code is Code.BUSY
    with pytest.raises(CakeError, match="not offered"):
        cache.write(2, PushChunk(id=1, offset=0, data=b"\x02"))


def test_payload_is_the_blocks_tensors_and_the_small_files(tmp_path: Path) -> None:
    folder = build_random_llama(tmp_path / "m", n_layers=3, shard=True)
    manifest = ModelManifest.for_folder(folder)
    config = LlamaConfig.from_folder(folder)
    items = Payload(manifest, config).items([1])
    tensors = {item.name for item in items if item.kind == "tensor"}
    assert tensors and all(name.startswith("model.layers.1.") for name in tensors)
    assert len(tensors) == 9
    assert "config.json" in {item.name for item in items if item.kind == "file"}
    # Cached: the second look hashes nothing and agrees; the fingerprint follows the bytes.
    again = ModelManifest.for_folder(folder)
    assert Payload(again, config).model == Payload(manifest, config).model
    other = ModelManifest.for_folder(build_random_llama(tmp_path / "o", n_layers=3, seed=5))
    assert other.fingerprint != manifest.fingerprint
    for item in items:
        assert hashlib.sha256(item.read(0, item.nbytes)).hexdigest() == item.sha256


def _deliver(items: list, model: str, cache: ModelCache) -> Path:
    """Push `items` into `cache` in process, as the worker's control loop would."""
    for request_id, item in enumerate(items):
        offset = cache.offer(1, item.offer(request_id, model))
        for start in range(offset, item.nbytes, 1 << 20):
            data = item.read(start, min(1 << 20, item.nbytes - start))
            cache.write(1, PushChunk(id=request_id, offset=start, data=data))
    return cache.folder(model)


def _block_state(folder: Path, blocks: list[int], **kw: object) -> dict[str, torch.Tensor]:
    from cake.model.loader import load_llama

    part = load_llama(folder, blocks, dtype=torch.bfloat16, max_seq_len=8, **kw)
    return {name: t.clone() for name, t in part.state_dict().items()}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_payload_is_what_the_worker_runs(
    tmp_path: Path, scheme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --quantize the worker receives its blocks quantized (NAME.q/.scales/.zeros), a
    fraction of the float bytes, and loads exactly what quantizing at load would build."""
    from cake.model.quant import Quantization

    monkeypatch.setenv("CAKE_CACHE_DIR", str(tmp_path / "master-cache"))
    folder = build_random_llama(tmp_path / "m", n_layers=3)
    config = LlamaConfig.from_folder(folder)
    manifest = ModelManifest.for_folder(folder)
    plain = Payload(manifest, config)
    quantized = Payload(manifest, config, Quantization(scheme))
    items = quantized.items([1])
    names = {item.name for item in items if item.kind == "tensor"}
    assert "model.layers.1.mlp.down_proj.weight.q" in names
    assert ("model.layers.1.mlp.down_proj.weight.zeros" in names) == (scheme == "int4")
    assert "model.layers.1.mlp.down_proj.weight" not in names
    assert "model.layers.1.input_layernorm.weight" in names  # norms stay float
    assert all(name.startswith("model.layers.1.") for name in names)
    float_bytes = sum(item.nbytes for item in plain.items([1]) if item.kind == "tensor")
    sent_bytes = sum(item.nbytes for item in items if item.kind == "tensor")
    assert sent_bytes < float_bytes * (0.3 if scheme == "int8" else 0.2)  # f32 source
    assert len({plain.model, quantized.model}) == 2  # each form has a cache folder of its own
    for item in items:
        assert hashlib.sha256(item.read(0, item.nbytes)).hexdigest() == item.sha256
    pushed = _deliver(items, quantized.model, ModelCache(tmp_path / "worker-cache"))
    expected = _block_state(folder, [1], quantization=Quantization(scheme))
    got = _block_state(pushed, [1])
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    # The hashes are cached: the next run converts nothing before it knows what to offer.
    from cake.cluster import payload as payload_module

    def no_conversion(self: object, name: str) -> None:
        raise AssertionError(f"{name} converted again just to hash it")

    monkeypatch.setattr(payload_module._Converter, "described", no_conversion)
    again = Payload(ModelManifest.for_folder(folder), config, Quantization(scheme)).items([1])
    assert [(i.name, i.sha256) for i in again] == [(i.name, i.sha256) for i in items]


@pytest.mark.slow  # SmolLM2's GGUF file: the real artefact
def test_gguf_payload_is_what_the_worker_runs(
    smollm2_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GGUF model is pushed as the loader decodes it (int4/int8 groups, q/k rows in Hugging
    Face order), never as float: the worker holds what a local GGUF load builds, bit for bit."""
    from cake.model.gguf import resolve_model_path

    folder = resolve_model_path(smollm2_gguf)
    monkeypatch.setenv("CAKE_CACHE_DIR", str(tmp_path / "master-cache"))
    config = LlamaConfig.from_folder(folder)
    manifest = ModelManifest.for_folder(folder)
    assert manifest.gguf is not None and "config.json" in manifest.files
    payload = Payload(manifest, config)
    assert payload.scheme == "int4"  # Q4_1 blocks: what the workers are asked to time
    items = payload.items([2])
    names = {item.name for item in items if item.kind == "tensor"}
    assert "model.layers.2.self_attn.q_proj.weight.zeros" in names
    stored = sum(manifest.tensors[n].nbytes for n in manifest.tensors if ".layers.2." in n)
    sent = sum(item.nbytes for item in items if item.kind == "tensor")
    assert sent < stored * 1.25  # int4 groups of 32 with bf16 scale+zero vs Q4_1's f16 pair
    pushed = _deliver(items, payload.model, ModelCache(tmp_path / "worker-cache"))
    expected, got = _block_state(folder, [2]), _block_state(pushed, [2])
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
