"""`--perplexity FILE`: how well the model predicts a text, locally or over a topology.

The file is tokenized as `--raw` prompts are (the tokenizer's own encoding, no chat template)
and cut into non-overlapping windows of at most `window` tokens (1024 by default, and never more
than the context). Each window is its own session, run through the step scheduler like a prompt
(one step, in micro-batches across the stages), asking for the hidden states of every position;
the head then runs on them 128 positions at a time, and every token after a window's first is
scored. The result is
exp(mean negative log-likelihood) over all scored tokens, which is what transformers gives for
the same windows (`LlamaForCausalLM(ids, labels=ids).loss`, weighted by tokens).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cake.engine.scheduler import StepScheduler
from cake.engine.session import Output
from cake.engine.stages import StageTimes

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 1024
HEAD_ROWS = 128  # positions per head call: bounds the (rows, vocab) float32 logits

Head = Callable[[torch.Tensor], Awaitable[torch.Tensor]]  # hidden (1, T, C) -> logits (1, T, V)
StageStats = dict[str, StageTimes]  # stage label -> where its time went, over every window


@dataclass
class Perplexity:
    nll_sum: float  # summed negative log-likelihood (nats) of the scored tokens
    tokens: int  # tokens scored

    @property
    def value(self) -> float:
        return math.exp(self.nll_sum / self.tokens)

    def line(self) -> str:
        return f"perplexity: {self.value:.4f} ({self.tokens} tokens)"


def windows(n_tokens: int, window: int) -> list[range]:
    """Non-overlapping windows [0, w), [w, 2w), ... covering n_tokens."""
    return [range(start, min(start + window, n_tokens)) for start in range(0, n_tokens, window)]


async def score_window(
    scheduler: StepScheduler, head: Head, token_ids: Sequence[int], stats: StageStats
) -> float:
    """Summed NLL of token_ids[1:] given the tokens before each, in one fresh session."""
    targets = torch.tensor(list(token_ids[1:]), dtype=torch.long)
    session = scheduler.open_session()
    session.stage_times = stats
    try:
        hidden = await session.forward(token_ids, 0, Output.HIDDEN)  # (1, T, C)
        nll = 0.0
        # hidden[:, j] predicts token j + 1; the last position predicts nothing here.
        for start in range(0, len(targets), HEAD_ROWS):
            rows = min(HEAD_ROWS, len(targets) - start)
            logits = await head(hidden[:, start : start + rows])  # (1, rows, vocab)
            wanted = targets[start : start + rows].to(logits.device)
            nll += float(F.cross_entropy(logits[0], wanted, reduction="sum"))
        return nll
    finally:
        await session.close()


async def perplexity(
    scheduler: StepScheduler,
    head: Head,
    token_ids: Sequence[int],
    max_seq_len: int,
    window: int = DEFAULT_WINDOW,
) -> Perplexity:
    """Perplexity of token_ids in windows of at most `window` tokens (and the context)."""
    if window < 2:
        raise ValueError(f"a perplexity window must hold at least 2 tokens, got {window}")
    window = min(window, max_seq_len)
    if len(token_ids) < 2:
        raise ValueError(
            f"the text has {len(token_ids)} token(s): perplexity needs at least 2 to score one"
        )
    stats: StageStats = {}
    total = Perplexity(0.0, 0)
    parts = windows(len(token_ids), window)
    for index, part in enumerate(parts, 1):
        ids = token_ids[part.start : part.stop]
        if len(ids) < 2:  # a last window of one token has nothing to score
            continue
        total.nll_sum += await score_window(scheduler, head, ids, stats)
        total.tokens += len(ids) - 1
        log.info(
            "window %d/%d (%d tokens): running perplexity %.4f",
            index,
            len(parts),
            len(ids),
            total.value,
        )
    return total


def read_text_file(path: str) -> str:
    """--perplexity FILE: its text (UTF-8), or a ValueError that says why not."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"--perplexity {path}: not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise ValueError(f"--perplexity {path}: {exc.strerror or exc}") from None
