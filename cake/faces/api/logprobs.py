"""Logprobs in OpenAI's two shapes: the chat's `{"content": [{token, logprob, bytes,
top_logprobs}]}` and the legacy completions' `{tokens, token_logprobs, top_logprobs,
text_offset}`. A token's text is its bytes as UTF-8 (a token that holds part of a character
shows U+FFFD; its `bytes` are exact)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cake.decoding.logprobs import TokenLogprobs

TokenBytes = Callable[[int], bytes]


def _entry(token_bytes: TokenBytes, token: int, logprob: float) -> dict[str, Any]:
    data = token_bytes(token)
    return {"token": data.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(data)}


def chat_logprobs(records: Sequence[TokenLogprobs], token_bytes: TokenBytes) -> dict[str, Any]:
    content = []
    for record in records:
        entry = _entry(token_bytes, record.token, record.logprob)
        entry["top_logprobs"] = [_entry(token_bytes, t, lp) for t, lp in record.top]
        content.append(entry)
    return {"content": content}


def completion_logprobs(
    records: Sequence[TokenLogprobs], token_bytes: TokenBytes, offset: int = 0
) -> dict[str, Any]:
    """`offset`: where in the completion's text the first of `records` starts (a stream's
    chunks continue where the last one ended)."""
    tokens, offsets = [], []
    for record in records:
        offsets.append(offset)
        tokens.append(token_bytes(record.token).decode("utf-8", "replace"))
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [record.logprob for record in records],
        "top_logprobs": [
            {token_bytes(t).decode("utf-8", "replace"): lp for t, lp in record.top}
            for record in records
        ],
        "text_offset": offsets,
    }
