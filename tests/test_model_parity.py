"""Our model against transformers' `LlamaForCausalLM` on random Llama 3-shaped checkpoints.

float32 logits within 1e-4 over a prefill and 20 cached decode steps, greedy generation
token-identical to transformers' greedy decoding, and cached decoding equal to uncached.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import build_random_llama, encode, greedy_tokens, reference_tokens
from transformers import LlamaForCausalLM

from cake.model.llama import Llama
from cake.model.loader import load_llama

ATOL = 1e-4  # float32 logits, ours vs the reference
PROMPT_LEN = 40
DECODE_STEPS = 20
MAX_SEQ_LEN = 128

# Each one differs from the first in one respect the model math or the loader must get right.
CONFIGS = {
    "gqa-llama3-untied": {},
    "tied-head_dim32": {"tie": True, "head_dim": 32, "n_layers": 5},
    "mha-default-rope": {"kv_heads": 4, "rope": "default"},
    "mqa-llama3": {"heads": 8, "kv_heads": 1, "hidden": 64},
    "sharded": {"shard": True},
    "bf16-on-disk": {"dtype": torch.bfloat16},
}


@dataclass
class Pair:
    folder: Path
    ours: Llama
    reference: LlamaForCausalLM
    n_layers: int
    vocab: int


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    options = CONFIGS[request.param]
    folder = build_random_llama(
        tmp_path_factory.mktemp(request.param), seed=len(request.param), **options
    )
    n_layers = options.get("n_layers", 4)
    reference = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = load_llama(
        folder,
        range(n_layers),
        with_embedding=True,
        with_head=True,
        dtype=torch.float32,
        max_seq_len=MAX_SEQ_LEN,
    )
    return Pair(folder, ours, reference, n_layers, reference.config.vocab_size)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.inference_mode():
        yield


def random_tokens(vocab: int, length: int, seed: int = 1234) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(vocab, (1, length), generator=generator)  # (1, T)


def ours_forward(model: Llama, tokens: torch.Tensor, start_pos: int, cache: dict) -> torch.Tensor:
    """Logits (1, T, vocab) for every position of `tokens`, placed at start_pos.."""
    hidden = model.embed(tokens)
    hidden = model.run_blocks(hidden, start_pos, cache, model.blocks)
    return model.head(hidden)


def ours_greedy(model: Llama, prompt: torch.Tensor, n_new: int) -> list[int]:
    cache = model.new_cache(MAX_SEQ_LEN)
    logits = ours_forward(model, prompt, 0, cache)[0, -1]
    out: list[int] = []
    position = prompt.shape[1]
    while True:
        token = int(torch.argmax(logits))
        out.append(token)
        if len(out) == n_new:
            return out
        logits = ours_forward(model, torch.tensor([[token]]), position, cache)[0, -1]
        position += 1


def test_fixture_writes_what_was_asked(pair: Pair) -> None:
    config = pair.reference.config
    assert pair.ours.blocks == list(range(pair.n_layers))
    assert pair.ours.config.n_layers == config.num_hidden_layers
    assert pair.ours.config.head_dim == config.head_dim
    assert pair.ours.config.n_kv_heads == config.num_key_value_heads
    if config.tie_word_embeddings:
        # One tensor serves both: the embedding rows are read from the head's single copy.
        assert pair.ours.model.embed_tokens is None and pair.ours.head_proj is not None
        reference_rows = pair.reference.model.embed_tokens.weight[:5]
        assert torch.equal(pair.ours.embed(torch.arange(5)[None])[0], reference_rows)


def test_prefill_and_cached_decode_logits_match_reference(pair: Pair) -> None:
    prompt = random_tokens(pair.vocab, PROMPT_LEN)
    cache = pair.ours.new_cache(MAX_SEQ_LEN)

    ours = ours_forward(pair.ours, prompt, 0, cache)
    reference = pair.reference(prompt).logits
    # A meaningful comparison needs logits that are not all near zero.
    assert reference.std() > 0.1
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0, msg="prefill logits")

    # Ours decodes one token at a time from its cache; the reference recomputes the whole
    # growing sequence, so a cache bug on our side cannot hide behind the same bug on theirs.
    sequence = prompt
    for step in range(DECODE_STEPS):
        token = reference[:, -1:].argmax(-1)  # (1, 1)
        sequence = torch.cat([sequence, token], dim=1)
        ours = ours_forward(pair.ours, token, sequence.shape[1] - 1, cache)[:, -1]
        reference = pair.reference(sequence).logits
        torch.testing.assert_close(
            ours, reference[:, -1], atol=ATOL, rtol=0, msg=lambda m, s=step: f"step {s}: {m}"
        )


def test_cached_decode_equals_uncached_prefill(pair: Pair) -> None:
    tokens = random_tokens(pair.vocab, 30, seed=99)
    whole = ours_forward(pair.ours, tokens, 0, pair.ours.new_cache(MAX_SEQ_LEN))[0]  # (T, V)

    # One token at a time.
    cache = pair.ours.new_cache(MAX_SEQ_LEN)
    for position in range(tokens.shape[1]):
        step = ours_forward(pair.ours, tokens[:, position : position + 1], position, cache)
        torch.testing.assert_close(step[0, -1], whole[position], atol=1e-5, rtol=0)

    # Uneven chunks: a multi-token forward that starts past 0 needs the offset causal mask.
    cache = pair.ours.new_cache(MAX_SEQ_LEN)
    start = 0
    for length in (11, 7, 1, 5, 6):
        chunk = ours_forward(pair.ours, tokens[:, start : start + length], start, cache)
        torch.testing.assert_close(chunk[0], whole[start : start + length], atol=1e-5, rtol=0)
        start += length
    assert start == tokens.shape[1]


def test_uncached_reference_agrees_with_our_decode_position(pair: Pair) -> None:
    """Decode at a late position (past rope's original context of 64) equals a full prefill."""
    tokens = random_tokens(pair.vocab, 90, seed=7)
    cache = pair.ours.new_cache(MAX_SEQ_LEN)
    ours_forward(pair.ours, tokens[:, :-1], 0, cache)
    last = ours_forward(pair.ours, tokens[:, -1:], tokens.shape[1] - 1, cache)[0, -1]
    reference = pair.reference(tokens).logits[0, -1]
    torch.testing.assert_close(last, reference, atol=ATOL, rtol=0)


def test_greedy_tokens_equal_transformers(pair: Pair) -> None:
    prompt = random_tokens(pair.vocab, 12, seed=5)
    expected = reference_tokens(pair.folder, prompt[0].tolist(), DECODE_STEPS)
    assert ours_greedy(pair.ours, prompt, DECODE_STEPS) == expected


def test_partial_models_compose_to_the_whole(pair: Pair) -> None:
    """Embedding + head in one part and the blocks split over two others give the same logits."""
    if pair.n_layers < 2:
        pytest.skip("needs two blocks")
    split = pair.n_layers // 2
    head = load_llama(pair.folder, (), with_embedding=True, with_head=True, max_seq_len=MAX_SEQ_LEN)
    first = load_llama(pair.folder, range(split), max_seq_len=MAX_SEQ_LEN)
    second = load_llama(pair.folder, range(split, pair.n_layers), max_seq_len=MAX_SEQ_LEN)
    assert head.blocks == [] and second.blocks == list(range(split, pair.n_layers))
    assert first.model.embed_tokens is None and first.head_proj is None

    tokens = random_tokens(pair.vocab, 16, seed=3)
    whole = ours_forward(pair.ours, tokens, 0, pair.ours.new_cache(MAX_SEQ_LEN))
    caches = [first.new_cache(MAX_SEQ_LEN), second.new_cache(MAX_SEQ_LEN)]
    hidden = head.embed(tokens)
    hidden = first.run_blocks(hidden, 0, caches[0], first.blocks)
    hidden = second.run_blocks(hidden, 0, caches[1], second.blocks)
    torch.testing.assert_close(head.head(hidden), whole, atol=0, rtol=0)


# --- through the Master (needs a tokenizer in the folder) ------------------------------------


@pytest.mark.parametrize("fixture_name", ["tiny_llama", "tiny_llama_tied"])
def test_master_greedy_equals_transformers(
    fixture_name: str, request: pytest.FixtureRequest
) -> None:
    folder: Path = request.getfixturevalue(fixture_name)
    prompt_ids = encode(folder, "Tell me a story about a dragon.")
    expected = reference_tokens(folder, prompt_ids, DECODE_STEPS)
    assert greedy_tokens(folder, prompt_ids, DECODE_STEPS, max_seq_len=MAX_SEQ_LEN) == expected
