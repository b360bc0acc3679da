"""Sampling on hand-made logits: greedy, repeat penalty, top-k, top-p, seeds."""

from __future__ import annotations

import math

import pytest
import torch

from cake.decoding.sampling import (
    Sampler,
    SamplingParams,
    apply_repeat_penalty,
    top_k_filter,
    top_p_filter,
)

NEG_INF = float("-inf")


def kept(logits: torch.Tensor) -> set[int]:
    return {i for i, v in enumerate(logits.tolist()) if v != NEG_INF}


def draws(params: SamplingParams, logits: torch.Tensor, n: int) -> list[int]:
    sampler = Sampler(params)
    return [sampler(logits, []) for _ in range(n)]


# --- parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": 0}, "top-k"),
        ({"top_p": 0.0}, "top-p"),
        ({"top_p": 1.5}, "top-p"),
        ({"repeat_penalty": 0.0}, "repeat-penalty"),
        ({"repeat_last_n": -1}, "repeat-last-n"),
    ],
)
def test_bad_parameters_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


# --- greedy ----------------------------------------------------------------------------------


def test_greedy_is_argmax() -> None:
    generator = torch.Generator().manual_seed(0)
    sampler = Sampler(SamplingParams(temperature=0.0))
    for _ in range(20):
        logits = torch.randn(1000, generator=generator)
        assert sampler(logits, []) == int(torch.argmax(logits))


def test_greedy_ignores_the_seed_and_other_filters() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    for seed in (1, 2, 3):
        params = SamplingParams(temperature=0.0, top_k=2, top_p=0.5, seed=seed)
        assert Sampler(params)(logits, []) == 1


def test_greedy_accepts_half_precision_logits() -> None:
    logits = torch.tensor([0.5, -2.0, 4.0, 1.0], dtype=torch.bfloat16)
    assert Sampler(SamplingParams(temperature=0.0))(logits, []) == 2


# --- repeat penalty --------------------------------------------------------------------------


def test_repeat_penalty_divides_positive_and_multiplies_negative() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0, 0.0, 4.0])
    out = apply_repeat_penalty(logits, [0, 1, 1, 4, 3], penalty=2.0)
    torch.testing.assert_close(out, torch.tensor([1.0, -2.0, 0.5, -6.0, 0.0, 4.0]))
    # The caller's logits are left alone.
    torch.testing.assert_close(logits, torch.tensor([2.0, -1.0, 0.5, -3.0, 0.0, 4.0]))


def test_repeat_penalty_of_one_or_no_history_changes_nothing() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5])
    torch.testing.assert_close(apply_repeat_penalty(logits, [0, 1], 1.0), logits)
    torch.testing.assert_close(apply_repeat_penalty(logits, [], 1.5), logits)


def test_repeat_penalty_turns_greedy_away_from_a_repeated_token() -> None:
    logits = torch.tensor([3.0, 2.0, -1.0])
    params = SamplingParams(temperature=0.0, repeat_penalty=2.0, repeat_last_n=4)
    assert Sampler(params)(logits, []) == 0
    assert Sampler(params)(logits, [0]) == 1  # 3.0 / 2 < 2.0


def test_repeat_penalty_only_looks_at_the_last_n_tokens() -> None:
    logits = torch.tensor([3.0, 2.0, -1.0])
    window = SamplingParams(temperature=0.0, repeat_penalty=2.0, repeat_last_n=2)
    assert Sampler(window)(logits, [0, 2, 2]) == 0  # token 0 fell out of the window
    assert Sampler(window)(logits, [2, 0, 2]) == 1
    off = SamplingParams(temperature=0.0, repeat_penalty=2.0, repeat_last_n=0)
    assert Sampler(off)(logits, [0, 0, 0]) == 0


# --- top-k -----------------------------------------------------------------------------------


def test_top_k_keeps_the_k_largest() -> None:
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    assert kept(top_k_filter(logits, 1)) == {1}
    assert kept(top_k_filter(logits, 2)) == {1, 3}
    assert kept(top_k_filter(logits, 3)) == {1, 2, 3}
    out = top_k_filter(logits, 2)
    assert out[1].item() == 5.0 and out[3].item() == 4.0  # kept values are unchanged


def test_top_k_at_or_above_the_vocabulary_keeps_everything() -> None:
    logits = torch.tensor([1.0, 5.0, 3.0])
    assert kept(top_k_filter(logits, 3)) == {0, 1, 2}
    assert kept(top_k_filter(logits, 10)) == {0, 1, 2}


def test_top_k_keeps_ties_at_the_threshold() -> None:
    logits = torch.tensor([1.0, 3.0, 3.0, 2.0])
    assert kept(top_k_filter(logits, 2)) == {1, 2}
    assert kept(top_k_filter(logits, 1)) == {1, 2}


# --- top-p -----------------------------------------------------------------------------------

# Probabilities 0.5, 0.2, 0.15, 0.1, 0.05 in a shuffled order.
PROBS = torch.tensor([0.1, 0.5, 0.05, 0.2, 0.15])
LOG_PROBS = PROBS.log()


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (0.3, {1}),  # 0.5 alone already covers 0.3
        (0.45, {1}),
        (0.55, {1, 3}),  # 0.5 + 0.2
        (0.8, {1, 3, 4}),  # 0.5 + 0.2 + 0.15 = 0.85
        (0.9, {1, 3, 4, 0}),  # + 0.1 = 0.95
        (0.99, {0, 1, 2, 3, 4}),
        (1.0, {0, 1, 2, 3, 4}),
    ],
)
def test_top_p_keeps_the_smallest_covering_set(p: float, expected: set[int]) -> None:
    assert kept(top_p_filter(LOG_PROBS, p)) == expected


def test_top_p_is_scale_aware_through_the_softmax() -> None:
    # Same order, different logits: softmax([2, 1, 0]) = 0.665, 0.245, 0.090.
    logits = torch.tensor([0.0, 2.0, 1.0])
    assert kept(top_p_filter(logits, 0.6)) == {1}
    assert kept(top_p_filter(logits, 0.7)) == {1, 2}
    assert kept(top_p_filter(logits, 0.95)) == {0, 1, 2}


def test_sampling_only_draws_kept_tokens() -> None:
    logits = torch.tensor([0.0, 1.0, 0.5, 0.9, 0.8, 0.2, 0.1, 0.3])
    top_k = draws(SamplingParams(temperature=1.0, top_k=3, seed=0), logits, 300)
    assert set(top_k) == {1, 3, 4}
    top_p = draws(SamplingParams(temperature=1.0, top_p=0.55, seed=0), LOG_PROBS, 300)
    assert set(top_p) == {1, 3}


# --- seeds and the distribution --------------------------------------------------------------

FLAT = torch.zeros(1000)


def test_same_seed_gives_the_same_tokens() -> None:
    params = SamplingParams(temperature=1.0, seed=1234)
    assert draws(params, FLAT, 50) == draws(params, FLAT, 50)


def test_different_seeds_give_different_tokens() -> None:
    first = draws(SamplingParams(temperature=1.0, seed=1), FLAT, 50)
    second = draws(SamplingParams(temperature=1.0, seed=2), FLAT, 50)
    assert first != second


def test_no_seed_gives_a_fresh_random_seed() -> None:
    params = SamplingParams(temperature=1.0)
    assert draws(params, FLAT, 50) != draws(params, FLAT, 50)


def test_samples_follow_the_softmax() -> None:
    logits = torch.tensor([math.log(0.7), math.log(0.3)])
    tokens = draws(SamplingParams(temperature=1.0, seed=7), logits, 4000)
    assert abs(tokens.count(0) / len(tokens) - 0.7) < 0.03


def softmax_at(logits: torch.Tensor, temperature: float) -> list[float]:
    return torch.softmax(logits.double() / temperature, dim=-1).tolist()


def total_variation(p: list[float], q: list[float]) -> float:
    return sum(abs(a - b) for a, b in zip(p, q, strict=True)) / 2


# 20,000 draws put the observed distribution within ~0.005 (TV) of the true one; a temperature
# 25% off moves the true one by 0.024 to 0.074 (4 tokens, logits 0..3), so the bound between
# them is one that a sampler with a wrong temperature fails, and this test shows that it does.
TEMPERATURE_DRAWS = 20_000
TV_BOUND = 0.012


# One temperature in the quick loop (where a sampler that ignores it would fail); all of them in
# the whole suite (20,000 draws each).
@pytest.mark.parametrize(
    "temperature",
    [pytest.param(t, marks=pytest.mark.slow) for t in (0.5, 1.0)]
    + [2.0, pytest.param(4.0, marks=pytest.mark.slow)],
)
def test_samples_follow_the_softmax_at_the_asked_temperature(temperature: float) -> None:
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    tokens = draws(SamplingParams(temperature=temperature, seed=7), logits, TEMPERATURE_DRAWS)
    observed = [tokens.count(i) / len(tokens) for i in range(len(logits))]
    assert total_variation(observed, softmax_at(logits, temperature)) < TV_BOUND
    for wrong in (temperature * 0.8, temperature * 1.25):
        assert total_variation(observed, softmax_at(logits, wrong)) > TV_BOUND, wrong


@pytest.mark.parametrize("temperature", [1e-4, 1e-30, 1e-45, 5e-324])
def test_a_tiny_temperature_is_greedy_like_not_an_overflow(temperature: float) -> None:
    generator = torch.Generator().manual_seed(3)
    for kwargs in ({}, {"top_p": 0.9}, {"top_k": 5}, {"repeat_penalty": 1.3}):
        sampler = Sampler(SamplingParams(temperature=temperature, seed=0, **kwargs))
        for _ in range(5):
            logits = torch.randn(1000, generator=generator) * 30
            logits[7] = logits.max() + 1e-3  # the best by a hair: still the one drawn
            assert sampler(logits, [1, 2]) == 7
    # Tied best logits stay a fair draw between them.
    tied = torch.tensor([1.0, 3.0, 3.0, 0.0])
    assert set(draws(SamplingParams(temperature=1e-40, seed=0), tied, 100)) == {1, 2}
