"""SmolLM2-135M-Instruct (real weights, its GGUF dequantized to f32 by transformers) against
transformers. The GGUF run natively is tested in test_quant.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from helpers import reference_tokens
from transformers import LlamaForCausalLM

from cake.decoding.sampling import SamplingParams
from cake.decoding.stats import GenerationStats
from cake.master import Master, MasterSettings
from cake.model.loader import load_llama
from cake.model.tokenizer import encode_prompt, load_tokenizer

pytestmark = pytest.mark.slow

MAX_SEQ_LEN = 256
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def master(smollm2_dir: Path) -> Master:
    opened = asyncio.run(
        Master.open(MasterSettings(smollm2_dir, device="cpu", dtype="f32", max_seq_len=256))
    )
    yield opened
    asyncio.run(opened.close())


@pytest.fixture(scope="module")
def reference(smollm2_dir: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


def generate(
    master: Master, prompt_ids: list[int], n: int, ignore_eos: bool = False
) -> tuple[list[int], GenerationStats]:
    stats = GenerationStats()

    async def run() -> list[int]:
        return [t async for t in master.generate(prompt_ids, GREEDY, n, ignore_eos, stats)]

    return asyncio.run(run()), stats


def test_answers_the_capital_of_france(master: Master) -> None:
    prompt_ids = master.encode("What is the capital of France?")
    tokens, stats = generate(master, prompt_ids, 48)
    text = master.tokenizer.decode(tokens, skip_special_tokens=True)
    assert "Paris" in text, text
    # A short answer ends on the model's own end-of-turn token, which is not yielded.
    assert stats.finish_reason == "stop"
    assert not set(tokens) & master.stop_ids
    assert stats.prompt_tokens == len(prompt_ids)
    assert stats.new_tokens == len(tokens)


def test_prefill_logits_match_transformers(smollm2_dir: Path, reference: LlamaForCausalLM) -> None:
    """The design's float32 bound (1e-4 on logits) holds on 30 real blocks with logits of
    magnitude ~40, as on the tiny random models (measured: max |diff| 0.0 on this prompt and
    on 563 tokens of prose, torch 2.13 CPU: both sides run the same float32 kernels)."""
    tokenizer = load_tokenizer(smollm2_dir)
    tokens = torch.tensor(
        [encode_prompt(tokenizer, "Explain why the sky is blue, in two sentences.")]
    )
    model = load_llama(smollm2_dir, range(30), True, True, dtype=torch.float32, max_seq_len=64)
    with torch.inference_mode():
        hidden = model.run_blocks(model.embed(tokens), 0, model.new_cache(64), model.blocks)
        ours = model.head(hidden)
        theirs = reference(tokens).logits
    assert theirs.abs().max() > 10
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_greedy_tokens_equal_transformers_for_32_tokens(master: Master, smollm2_dir: Path) -> None:
    # Both sides run the full length: ours with ignore_eos, the reference with no EOS at all.
    prompt_ids = master.encode("Write a short poem about the sea.")
    expected = reference_tokens(smollm2_dir, prompt_ids, 32)
    tokens, stats = generate(master, prompt_ids, 32, ignore_eos=True)
    assert len(expected) == 32
    assert stats.new_tokens == 32
    assert stats.finish_reason == "length"
    assert tokens == expected
