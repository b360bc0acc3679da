"""Llama-3.2-1B-Instruct's config.json, literal, in both spellings a published checkpoint has.

tests/data/llama-3.2-1b-instruct/config.json is the file as Meta published it (written by
transformers 4.45: `rope_theta` beside a `rope_scaling` map); the -transformers5 folder holds
the same config as transformers >= 5 saves it (one `rope_parameters` map holding rope_theta and
the scaling, `dtype` for `torch_dtype`). Checkpoints re-saved by either version are on the hub,
so both must give the same model: the same LlamaConfig, the same RoPE frequencies as
transformers, and the same wire fingerprint, so a master and a worker whose folders were saved
by different transformers versions still agree.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from cake.model.config import LlamaConfig, architecture_of
from cake.model.llama import rope_inv_freq
from cake.wire.protocol import fingerprint_config

DATA = Path(__file__).parent / "data"
SPELLINGS = {
    "transformers4": DATA / "llama-3.2-1b-instruct",
    "transformers5": DATA / "llama-3.2-1b-instruct-transformers5",
}


@pytest.fixture(scope="module")
def configs() -> dict[str, LlamaConfig]:
    return {name: LlamaConfig.from_folder(folder) for name, folder in SPELLINGS.items()}


def test_the_fixtures_are_the_two_spellings() -> None:
    """Guard the fixtures themselves: one file per spelling, the rope in different places."""
    old, new = (json.loads((f / "config.json").read_text()) for f in SPELLINGS.values())
    assert old["rope_theta"] == 500000.0 and old["rope_scaling"]["rope_type"] == "llama3"
    assert "rope_parameters" not in old
    assert "rope_theta" not in new and "rope_scaling" not in new
    assert new["rope_parameters"]["rope_theta"] == 500000.0
    assert {k: v for k, v in new["rope_parameters"].items() if k != "rope_theta"} == (
        old["rope_scaling"]
    )


def test_both_spellings_read_to_the_published_config(configs: dict[str, LlamaConfig]) -> None:
    old, new = configs["transformers4"], configs["transformers5"]
    assert old == new  # every field but `raw` (the dict as read)
    assert (old.hidden_size, old.intermediate_size, old.n_layers) == (2048, 8192, 16)
    assert (old.n_heads, old.n_kv_heads, old.head_dim) == (32, 8, 64)
    assert (old.vocab_size, old.max_position_embeddings) == (128256, 131072)
    assert old.rms_norm_eps == 1e-5 and old.rope_theta == 500000.0
    assert old.tie_word_embeddings is True
    assert old.rope_scaling == {
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192.0,
    }
    assert old.eos_token_ids == (128001, 128008, 128009) and old.bos_token_id == 128000


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_rope_frequencies_equal_transformers_llama3_init(
    configs: dict[str, LlamaConfig], spelling: str
) -> None:
    """Ours from our reading of the file; theirs from transformers' reading of the same file
    (its llama3 rope init). Equal to float32 rounding (measured: bit for bit); and the scaling
    really applies (the longest wavelengths are divided by 32), so plain RoPE would fail."""
    theirs = LlamaRotaryEmbedding(AutoConfig.from_pretrained(SPELLINGS[spelling])).inv_freq
    ours = rope_inv_freq(configs[spelling])
    assert ours.shape == theirs.shape == (32,)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    plain = rope_inv_freq(replace(configs[spelling], rope_scaling=None))
    assert torch.allclose(ours[-1], plain[-1] / 32) and torch.equal(ours[0], plain[0])


def test_both_spellings_share_the_wire_fingerprint(configs: dict[str, LlamaConfig]) -> None:
    """The handshake's fingerprint (what master.py and worker.py send and compare) is the same
    for both spellings, and still sees the rope: Llama 3.1's factor 8 or no scaling differ."""
    fingerprints = {name: fingerprint_config(architecture_of(c)) for name, c in configs.items()}
    assert fingerprints["transformers4"] == fingerprints["transformers5"]
    config = configs["transformers4"]
    llama31 = replace(config, rope_scaling={**config.rope_scaling, "factor": 8.0})
    for other in (llama31, replace(config, rope_scaling=None)):
        assert fingerprint_config(architecture_of(other)) != fingerprints["transformers4"]
