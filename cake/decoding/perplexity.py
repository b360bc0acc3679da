"""`--perplexity FILE`: how well the model predicts a text, locally or over a topology.

The file is tokenized as `--raw` prompts are (the tokenizer's own encoding, no chat template)
and cut into non-overlapping windows of at most `window` tokens (1024 by default, and never more
than the context). Each window is its own session, run through the stages like a prompt (in
prefill chunks); every token after a window's first is scored. The result is
exp(mean negative log-likelihood) over all scored tokens, which is what transformers gives for
the same windows (`LlamaForCausalLM(ids, labels=ids).loss`, weighted by tokens).
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cake.master import GenerationStats, Master

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 1024
HEAD_ROWS = 128  # positions per head call: bounds the (rows, vocab) float32 logits


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


async def score_window(master: Master, token_ids: Sequence[int], stats: GenerationStats) -> float:
    """Summed NLL of token_ids[1:] given the tokens before each, in one fresh session."""
    targets = torch.tensor(list(token_ids[1:]), dtype=torch.long)
    session_id = uuid.uuid4().hex
    nll = 0.0
    try:
        async for start, hidden in master.forward_chunks(session_id, token_ids, 0, stats):
            # hidden[:, j] (position start + j) predicts token start + j + 1, if there is one.
            n_scored = min(hidden.shape[1], len(targets) - start)
            for row in range(0, n_scored, HEAD_ROWS):
                rows = min(HEAD_ROWS, n_scored - row)
                logits = await master.head_logits(hidden[:, row : row + rows])  # (1, rows, V)
                wanted = targets[start + row : start + row + rows].to(logits.device)
                nll += float(F.cross_entropy(logits[0], wanted, reduction="sum"))
    finally:
        await master.close_session(session_id)
    return nll


async def perplexity(
    master: Master, token_ids: Sequence[int], window: int = DEFAULT_WINDOW
) -> Perplexity:
    """Perplexity of token_ids in windows of at most `window` tokens (and the context)."""
    if window < 2:
        raise ValueError(f"a perplexity window must hold at least 2 tokens, got {window}")
    window = min(window, master.max_seq_len)
    if len(token_ids) < 2:
        raise ValueError(
            f"the text has {len(token_ids)} token(s): perplexity needs at least 2 to score one"
        )
    stats = GenerationStats()
    total = Perplexity(0.0, 0)
    parts = windows(len(token_ids), window)
    for index, part in enumerate(parts, 1):
        ids = token_ids[part.start : part.stop]
        if len(ids) < 2:  # a last window of one token has nothing to score
            continue
        total.nll_sum += await score_window(master, ids, stats)
        total.tokens += len(ids) - 1
        log.info(
            "window %d/%d (%d tokens): running perplexity %.4f",
            index,
            len(parts),
            len(ids),
            total.value,
        )
    return total


async def perplexity_of_file(master: Master, path: str, window: int = DEFAULT_WINDOW) -> Perplexity:
    """Read a UTF-8 text file, tokenize it like --raw, score it."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"--perplexity {path}: not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise ValueError(f"--perplexity {path}: {exc.strerror or exc}") from None
    token_ids = master.encode(text, raw=True)
    log.info("%s: %d tokens, windows of %d", path, len(token_ids), min(window, master.max_seq_len))
    return await perplexity(master, token_ids, window)
