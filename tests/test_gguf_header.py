"""The GGUF header walk (cake/model/gguf/header.py) skips the tokenizer's string arrays by their
lengths, read a chunk at a time: whatever the chunk size, the walk lands where gguf's own reader
says every key and tensor lies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from cake.model.gguf import header


@pytest.mark.parametrize("chunk", [8, 13, 64, 1 << 20])
def test_skipping_string_arrays_lands_where_gguf_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
):
    path = tmp_path / "strings.gguf"
    writer = GGUFWriter(str(path), "llama")
    tokens = ["", "a", "hello world", "ß" * 40, *(f"token{i}" * (i % 7) for i in range(300))]
    writer.add_token_list(tokens)  # a string array under tokenizer.ggml.: skipped
    writer.add_token_merges(["a b", "", "c d" * 30])
    writer.add_block_count(3)  # a key after the skipped arrays
    writer.add_tensor("blk.0.attn_norm.weight", np.arange(8, dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    monkeypatch.setattr(header, "SKIP_CHUNK", chunk)
    header._read.cache_clear()
    read = header.read_header(path)
    header._read.cache_clear()
    assert read.metadata["llama.block_count"] == 3
    reference = GGUFReader(path)
    assert {t.name: (int(t.data_offset), int(t.n_bytes)) for t in reference.tensors} == {
        name: (info.offset, info.nbytes) for name, info in read.tensors.items()
    }
