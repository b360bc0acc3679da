"""Choosing the next token from logits: repeat penalty, temperature, top-k, top-p, seeded draws."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    repeat_penalty: float = 1.0  # 1.0 = off
    repeat_last_n: int = 64
    seed: int | None = None  # None = a fresh random seed

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 means greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top-k must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError("top-p must be in (0, 1]")
        if self.repeat_penalty <= 0:
            raise ValueError("repeat-penalty must be > 0 (1.0 turns it off)")
        if self.repeat_last_n < 0:
            raise ValueError("repeat-last-n must be >= 0")


def apply_repeat_penalty(
    logits: torch.Tensor, recent_tokens: Sequence[int], penalty: float
) -> torch.Tensor:
    """Make recently seen tokens less likely: positive logits divided, negative multiplied."""
    if penalty == 1.0 or not recent_tokens:
        return logits
    ids = torch.tensor(sorted(set(recent_tokens)), dtype=torch.long, device=logits.device)
    seen = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (ties at the threshold kept); the rest become -inf."""
    if k >= logits.shape[-1]:
        return logits
    threshold = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities add up to at least p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= p  # the top token always has mass_before 0, so it stays
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


class Sampler:
    """Draws tokens for one generation; the same seed and logits give the same tokens.

    Every draw of cake's (plain decoding, a drafter's guesses, speculative decoding's acceptance
    and residual draws) goes through these methods, so one seeded generator orders them all.
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        seed = params.seed if params.seed is not None else random.randrange(2**63)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, history: Sequence[int]) -> int:
        """logits: (vocab,) for the next position; history: every token so far (or at least
        its last `repeat_last_n`, see `context`)."""
        return self.pick(logits, history)[0]

    def pick(self, logits: torch.Tensor, history: Sequence[int]) -> tuple[int, torch.Tensor | None]:
        """The next token, and the distribution (vocab,) it was drawn from (None when greedy)."""
        probs = self.distribution(logits, history)
        if probs is None:
            return int(torch.argmax(self.adjusted(logits, history))), None
        return self.draw(probs), probs

    def draw(self, probs: torch.Tensor) -> int:
        """One token from `probs` (vocab,), which need not sum to one."""
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def accepts(self, p_token: float, q_token: float) -> bool:
        """Speculative decoding's test: accept a drafted token with probability
        min(1, p / q), as u * q < p (no division; q = 0 never accepts)."""
        u = float(torch.rand((), generator=self.generator))
        return q_token > 0 and u * q_token < p_token

    def context(self, history: Sequence[int]) -> list[int]:
        """The part of `history` a draw looks at (the repeat penalty's window): a caller that
        extends a context token by token copies this much, not the whole history."""
        n = self.params.repeat_last_n
        return list(history[-n:]) if n else []

    def adjusted(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        """The logits (vocab,) after the repeat penalty, as float32 on the CPU."""
        p = self.params
        logits = logits.float().cpu()
        if p.repeat_last_n:
            logits = apply_repeat_penalty(logits, history[-p.repeat_last_n :], p.repeat_penalty)
        return logits

    def distribution(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor | None:
        """The probabilities (vocab,) a draw uses after every setting; None when greedy.

        Speculative decoding's rejection rule needs the same distribution the plain draw uses.
        """
        p = self.params
        if p.temperature == 0:
            return None
        # Shifted so the largest logit is 0 before dividing: every value is then <= 0, so a
        # tiny temperature (1e-30, or one below float32's range) sends the others to -inf
        # instead of overflowing to inf (inf - inf is NaN in the softmax): greedy-like, as asked.
        # A temperature that float32 rounds to 0 is held at its smallest normal value (0 / 0).
        temperature = max(p.temperature, torch.finfo(torch.float32).tiny)
        logits = self.adjusted(logits, history)
        logits = (logits - logits.max()) / temperature
        if p.top_k is not None:
            logits = top_k_filter(logits, p.top_k)
        if p.top_p is not None:
            logits = top_p_filter(logits, p.top_p)
        return torch.softmax(logits, dim=-1)
