"""GGUF Q4_0/Q4_1/Q8_0 weights run where they lie in the mapped file (cake/model/gguf/mapped.py,
cake/model/mapped_linear.py): the products equal those of the stored weight, rows come back
exact, a loaded model's blocks are views of the file (no copy), and where cake's kernels are
not available the same file loads converted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_files import write_gguf

from cake.errors import ModelFolderError
from cake.model.config import LlamaConfig
from cake.model.gguf import GGUFCheckpoint, resolve_model_path
from cake.model.gguf import mapped as mapped_module
from cake.model.gguf.mapped import (
    BLOCK_BYTES,
    PAGE,
    MappedBlocks,
    mapped_blocks,
    page_in,
    page_spans,
)
from cake.model.kernels import native, probe
from cake.model.linear import describe
from cake.model.loader import load_llama
from cake.model.mapped_linear import MappedEmbedding, MappedLinear

needs_native = pytest.mark.skipif(
    native.library() is None, reason=f"no native kernels: {native.unavailable_reason()}"
)


def random_blocks(kind: str, out: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random blocks with plausible f16 scales (and Q4_1 minimums), flat bytes."""
    rng = np.random.default_rng(seed)
    size, n = BLOCK_BYTES[kind], out * cols // 32
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    raw[:, :2] = (rng.random(n) * 0.02 + 1e-3).astype(np.float16).view(np.uint8).reshape(n, 2)
    if kind == "Q4_1":
        raw[:, 2:4] = (-rng.random(n) * 0.1).astype(np.float16).view(np.uint8).reshape(n, 2)
    return raw.reshape(-1)


def stored_weight(raw: np.ndarray, kind: str, out: int, cols: int) -> torch.Tensor:
    """The (out, cols) f64 weight the blocks stand for, from the format's definition."""
    size = BLOCK_BYTES[kind]
    blocks = raw.reshape(-1, size)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float64)
    if kind == "Q8_0":  # d * q, q int8
        return torch.from_numpy((blocks[:, 2:].copy().view(np.int8) * d).reshape(out, cols))
    low = blocks[:, 2:4].copy().view(np.float16).astype(np.float64) if kind == "Q4_1" else -8 * d
    nibbles = blocks[:, size - 16 :]
    values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float64)
    return torch.from_numpy((values * d + low).reshape(out, cols))


def mapped(tmp_path: Path, kind: str, out: int, cols: int) -> tuple[MappedBlocks, torch.Tensor]:
    raw = random_blocks(kind, out, cols)
    path = tmp_path / f"{kind}.bin"
    path.write_bytes(b"\0" * 64 + raw.tobytes())  # at an offset, as in a GGUF file
    return mapped_blocks(path, kind, (out, cols), 64, raw.size), stored_weight(raw, kind, out, cols)


@needs_native
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 3, 32, 40])  # the decode kernel up to 32 rows, tiles beyond
def test_products_are_those_of_the_stored_weight(tmp_path: Path, kind: str, rows: int) -> None:
    blocks, weight = mapped(tmp_path, kind, 96, 352)  # 11 blocks a row: the odd tail too
    x = torch.randn(rows, 352)
    y = MappedLinear(blocks, torch.float32)(x)
    exact = x.double() @ weight.T
    assert ((y.double() - exact).norm() / exact.norm()).item() < 1e-4


@needs_native
def test_a_permuted_weight_gathers_its_outputs_and_rows(tmp_path: Path) -> None:
    """q/k rows stay in llama.cpp's order in the file; the module answers in the model's."""
    blocks, weight = mapped(tmp_path, "Q4_0", 64, 128)
    order = torch.randperm(64)
    module = MappedLinear(blocks.rows(order), torch.float32)
    x = torch.randn(2, 128)
    exact = x.double() @ weight[order].T
    assert ((module(x).double() - exact).norm() / exact.norm()).item() < 1e-4
    ids = torch.tensor([[5, 0], [63, 5]])
    torch.testing.assert_close(module.rows(ids), weight[order][ids].float(), rtol=0, atol=0)
    for bad in (64, -1):  # never read past the blocks
        with pytest.raises(IndexError, match="0-63"):
            module.rows(torch.tensor([1, bad]))


@needs_native
def test_an_embedding_table_hands_out_exact_rows(tmp_path: Path) -> None:
    blocks, weight = mapped(tmp_path, "Q8_0", 50, 64)
    ids = torch.tensor([[3, 49, 3, 0]])
    rows = MappedEmbedding(blocks, torch.bfloat16)(ids)
    assert rows.dtype == torch.bfloat16 and rows.shape == (1, 4, 64)
    torch.testing.assert_close(rows, weight[ids].to(torch.bfloat16), rtol=0, atol=0)


def test_a_truncated_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "short.gguf"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(ModelFolderError, match=r"truncated.*download it again"):
        mapped_blocks(path, "Q4_0", (4, 64), 0, 4 * 2 * 18)


def test_paging_in_covers_the_weights_pages_once(tmp_path: Path) -> None:
    """Two weights side by side in the file page in as one span from the first's page start;
    one far after them as its own; the thread that pages them in ends."""
    raw = random_blocks("Q4_0", 64, 256)
    path = tmp_path / "three.bin"
    far = 5 * PAGE
    path.write_bytes(b"\0" * 100 + raw.tobytes() * 2 + b"\0" * far + raw.tobytes())
    first, second, third = (
        mapped_blocks(path, "Q4_0", (64, 256), offset, raw.size)
        for offset in (100, 100 + raw.size, 100 + 2 * raw.size + far)
    )
    base = first.data.data_ptr() - 100
    spans = page_spans([third, second, first])
    assert spans == [
        (base, base + 100 + 2 * raw.size),
        ((base + 100 + 2 * raw.size + far) // PAGE * PAGE, third.data.data_ptr() + raw.size),
    ]
    thread = page_in([first, second, third])
    assert thread is not None
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_a_file_that_cannot_be_mapped_names_the_way_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "fuse.gguf"
    path.write_bytes(b"\0" * 4096)

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(19, "No such device")

    monkeypatch.setattr(mapped_module.mmap, "mmap", refuse)
    with pytest.raises(ModelFolderError, match=r"cannot be memory-mapped.*--no-mmap"):
        mapped_blocks(path, "Q4_0", (2, 64), 0, 2 * 2 * 18)


@pytest.fixture(scope="module")
def q4_0_gguf(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mapped") / "tiny-q4_0.gguf"
    write_gguf(tiny_llama, path, "Q4_0")
    return path


@pytest.fixture(scope="module")
def q8_0_gguf(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mapped") / "tiny-q8_0.gguf"
    write_gguf(tiny_llama, path, "Q8_0")
    return path


@needs_native
@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_a_loaded_model_runs_views_of_the_file(qtype: str, request: pytest.FixtureRequest) -> None:
    """Every block projection, the head and the embedding of a Q4_0 (Q8_0) file are views of
    one mapping of it (nothing copied), and the model answers as the converted load of the same
    file does (the mapped blocks keep their f16 scales, the converted ones round them to bf16;
    Q8_0 converts to int8 per channel: close, not equal)."""
    gguf = request.getfixturevalue(f"{qtype.lower()}_gguf")
    folder = resolve_model_path(gguf)
    config = LlamaConfig.from_folder(folder)
    probe.use("avx2")
    try:
        part = load_llama(folder, range(config.n_layers), True, True, max_seq_len=16)
    finally:
        probe.use(probe.AUTO)
    modules = [m for m in part.modules() if isinstance(m, MappedLinear)]
    assert len(modules) == 7 * config.n_layers + 2  # q, k, v, o, gate, up, down; head; table
    assert isinstance(part.model.embed_tokens, MappedEmbedding)
    bases = {m.blocks.data.untyped_storage().data_ptr() for m in modules}
    assert len(bases) == 1  # one mapping of the file, which every weight is a view of
    start, size = bases.pop(), gguf.stat().st_size
    for module in modules:
        offset = module.blocks.data.data_ptr() - start
        assert offset >= 0 and offset + module.blocks.nbytes <= size

    probe.use("dense")
    try:
        converted = load_llama(folder, range(config.n_layers), True, True, max_seq_len=16)
    finally:
        probe.use(probe.AUTO)
    assert not any(isinstance(m, MappedLinear) for m in converted.modules())
    tokens = torch.tensor([[1, 7, 42, 99, 3]])
    with torch.inference_mode():
        ours, theirs = (
            model.head(model.run_blocks(model.embed(tokens), 0, model.new_cache(16), model.blocks))
            for model in (part, converted)
        )
    assert ((ours - theirs).norm() / theirs.norm()).item() < 0.02


def test_without_cake_kernels_the_blocks_are_converted(
    q4_0_gguf: Path, without_native_kernels: None
) -> None:
    part = load_llama(resolve_model_path(q4_0_gguf), [0], True, True, max_seq_len=16)
    assert describe(part.model.layers["0"].self_attn.qkv) == "int4/g32"
    assert not any(isinstance(m, (MappedLinear, MappedEmbedding)) for m in part.modules())


def test_no_mmap_converts_the_blocks(q4_0_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--no-mmap (CAKE_NO_MMAP=1): the blocks are read and converted, as without cake's kernels."""
    monkeypatch.setenv("CAKE_NO_MMAP", "1")
    part = load_llama(resolve_model_path(q4_0_gguf), [0], True, True, max_seq_len=16)
    assert not any(isinstance(m, (MappedLinear, MappedEmbedding)) for m in part.modules())


def test_float_tensors_are_views_of_the_mapping(tiny_llama: Path, tmp_path: Path) -> None:
    """An F32 GGUF's weights run in float32 are the file's bytes where they lie: an unfused
    projection (o_proj, kept as stored) is a view into the mapping, and copy-on-write keeps a
    write to it off the file."""
    path = tmp_path / "tiny-f32.gguf"
    write_gguf(tiny_llama, path, "F32")
    folder = resolve_model_path(path)
    checkpoint = GGUFCheckpoint(path, *_heads(folder))
    name = "model.layers.0.self_attn.o_proj.weight"
    (weight,) = checkpoint.load([name], torch.float32, "cpu", mapped=True).values()
    (read,) = checkpoint.load([name], torch.float32, "cpu").values()
    assert torch.equal(weight, read)
    base = mapped_module._file_bytes(str(path.resolve()), path.stat().st_mtime_ns)
    offset = weight.data_ptr() - base.data_ptr()
    assert 0 < offset < path.stat().st_size
    before = path.read_bytes()
    weight.add_(1.0)  # nothing in cake writes weights; were it to, the file stays as it was
    assert path.read_bytes() == before


def _heads(folder: Path) -> tuple[int, int]:
    config = LlamaConfig.from_folder(folder)
    return config.n_heads, config.n_kv_heads
