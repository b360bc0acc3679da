"""--perplexity: equals transformers' perplexity over the same windows, locally and over
workers, and the CLI prints it as the last stdout line."""

from __future__ import annotations

import asyncio
import math
import re
from pathlib import Path

import pytest
import torch
from cluster import cluster
from helpers import run_cli

from cake.decoding.perplexity import windows
from cake.master import Master, MasterSettings

PROSE = Path(__file__).parent / "data" / "prose.txt"


def reference_perplexity(folder: Path, token_ids: list[int], window: int) -> tuple[float, int]:
    """transformers: exp of the token-weighted mean of each window's loss."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for part in windows(len(token_ids), window):
            ids = torch.tensor([token_ids[part.start : part.stop]])
            if ids.shape[1] < 2:
                continue
            loss = model(input_ids=ids, labels=ids).loss
            nll += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(nll / count), count


def test_windows() -> None:
    assert windows(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert windows(4, 1024) == [range(0, 4)]


@pytest.mark.slow
def test_smollm2_fp32_equals_transformers(smollm2_dir: Path) -> None:
    """Real weights, real prose: its first 384 tokens in two windows (256, 128), each prefilled
    in chunks of 100."""

    async def ours() -> tuple[list[int], float, int]:
        master = await Master.open(
            MasterSettings(
                smollm2_dir, device="cpu", dtype="f32", max_seq_len=512, prefill_chunk=100
            )
        )
        try:
            ids = master.encode(PROSE.read_text(encoding="utf-8"), raw=True)[:384]
            result = await master.perplexity(ids, window=256)
            return ids, result.value, result.tokens
        finally:
            await master.close()

    ids, value, tokens = asyncio.run(ours())
    assert len(ids) == 384
    expected, count = reference_perplexity(smollm2_dir, ids, 256)
    assert tokens == count == len(ids) - len(windows(len(ids), 256))
    assert 1 < value < 100, value  # real prose, a real model
    assert value == pytest.approx(expected, rel=2e-3)


def test_over_workers_equals_local_and_transformers(tiny_llama: Path, tmp_path: Path) -> None:
    layers = {"w1": ["model.layers.0-1"], "w2": ["model.layers.2"]}  # block 3 on the master
    text = PROSE.read_text(encoding="utf-8")[:600]

    async def main() -> tuple[list[int], float, float]:
        local = await Master.open(
            MasterSettings(tiny_llama, device="cpu", dtype="f32", prefill_chunk=16)
        )
        try:
            ids = local.encode(text, raw=True)
            alone = (await local.perplexity(ids, window=64)).value
        finally:
            await local.close()
        async with cluster(tiny_llama, tmp_path, layers) as (topology, _):
            master = await Master.open(
                MasterSettings(tiny_llama, topology, device="cpu", dtype="f32", prefill_chunk=16)
            )
            try:
                spread = (await master.perplexity(ids, window=64)).value
            finally:
                await master.close()
        return ids, alone, spread

    ids, alone, spread = asyncio.run(main())
    assert len(ids) > 128
    expected, _ = reference_perplexity(tiny_llama, ids, 64)
    assert alone == pytest.approx(expected, rel=1e-4)
    assert spread == pytest.approx(alone, rel=1e-5)


def test_cli_prints_perplexity_last(tiny_llama: Path, tmp_path: Path) -> None:
    """cake-cli --perplexity (in this process): the value last on stdout; a file too short for
    one is one error line."""
    result = run_cli("--device", "cpu", "--model", str(tiny_llama), "--perplexity", str(PROSE))
    assert result.exit_code == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"perplexity: (\d+\.\d{4}) \((\d+) tokens\)", last)
    assert match, result.stdout
    assert int(match.group(2)) > 500  # one window of at most 1024 (the context is 512 here)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = run_cli("--device", "cpu", "--model", str(tiny_llama), "--perplexity", str(empty))
    assert result.exit_code == 1
    assert "perplexity needs at least 2" in result.stderr
    assert result.stdout == ""
