"""Log-probabilities of the chosen tokens, as OpenAI's `logprobs` reports them.

They are the model's own: `log_softmax` of the raw logits, before the repeat penalty,
temperature, top-k, top-p and a grammar's mask (as OpenAI and vLLM report them), so that a
request's logprobs do not depend on how it was sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20  # OpenAI's chat limit; the legacy completions endpoint allows 5


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated token: its log-probability and the `top` most likely tokens at its
    position, (token id, log-probability), most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> TokenLogprobs:
    """logits (vocab,) of the position `token` was chosen for; `top` alternatives (0..20)."""
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {top}")
    logprobs = torch.log_softmax(logits.float().cpu(), dim=-1)
    best = torch.topk(logprobs, top) if top else None
    alternatives = (
        tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best else ()
    )
    return TokenLogprobs(token, float(logprobs[token]), alternatives)
