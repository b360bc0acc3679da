"""Drafters: cheap guesses of the next few tokens, for speculative decoding to verify.

A drafter proposes up to k tokens that follow `history` (every token so far, the prompt
included). The model then checks all of them in one forward (cake/decoding/speculative.py), so a good
guess saves round trips and a bad one costs only the extra positions in that forward.

- `LookupDrafter` (`--draft lookup`): prompt-lookup decoding. Find the latest earlier occurrence
  of the last n tokens and propose what followed it. Free, and strong on text that repeats its
  context (editing, summarising, code, retrieval answers).
- `ModelDrafter` (`--draft PATH`): a small model with the same tokenizer, run whole on the
  master, proposing its own continuation one token at a time.

Each `propose` returns a `Draft`: the tokens, and for a drafter that samples, the distribution
each token was drawn from (the rejection rule needs it). A deterministic guess has none: it is a
point mass on the token.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from cake.decoding.sampling import Sampler
from cake.model.kv_cache import SessionCache
from cake.model.llama import Llama

log = logging.getLogger(__name__)

LOOKUP_MAX_NGRAM = 3
# One-token matches in free text are mostly chance: they cost verification positions and win
# little, so lookup needs at least two tokens of context to match.
LOOKUP_MIN_NGRAM = 2


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)
    # The distribution (vocab,) each token was sampled from; None: each is a point mass.
    probs: list[torch.Tensor] | None = None


class Drafter(Protocol):
    """Per generation: proposes continuations of the accepted history."""

    def propose(self, history: Sequence[int], k: int, sampler: Sampler) -> Draft: ...


class LookupDrafter:
    """Prompt-lookup drafting over an incrementally built n-gram index of the history."""

    def __init__(
        self, max_ngram: int = LOOKUP_MAX_NGRAM, min_ngram: int = LOOKUP_MIN_NGRAM
    ) -> None:
        self.ngram_sizes = range(max_ngram, min_ngram - 1, -1)  # longest first
        # n -> n-gram -> index of its last token, latest occurrence.
        self.last_seen: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.ngram_sizes}
        self.tokens: list[int] = []
        self.indexed = 0  # n-grams ending before this index are in `last_seen`

    def _sync(self, history: Sequence[int]) -> None:
        if len(history) < len(self.tokens) or list(history[: len(self.tokens)]) != self.tokens:
            self.__init__(max(self.ngram_sizes), min(self.ngram_sizes))  # history changed: redo
        self.tokens.extend(history[len(self.tokens) :])
        # Index every n-gram that ends before the last token: the n-gram ending at the last token
        # is what we look up, and its own occurrence must not match itself.
        for end in range(self.indexed, len(self.tokens) - 1):
            for n in self.ngram_sizes:
                if end + 1 >= n:
                    self.last_seen[n][tuple(self.tokens[end + 1 - n : end + 1])] = end
        self.indexed = max(self.indexed, len(self.tokens) - 1)

    def propose(self, history: Sequence[int], k: int, sampler: Sampler) -> Draft:
        self._sync(history)
        tokens = self.tokens
        if k <= 0:
            return Draft()
        for n in self.ngram_sizes:
            if len(tokens) < n:
                continue
            end = self.last_seen[n].get(tuple(tokens[-n:]))
            if end is not None:
                return Draft(tokens[end + 1 : end + 1 + k])
        return Draft()


class DraftModel:
    """A whole small model on the master, shared by every generation; caches are per drafter."""

    def __init__(self, model: Llama, max_seq_len: int, label: str) -> None:
        self.model = model
        self.max_seq_len = max_seq_len
        self.label = label

    def drafter(self) -> ModelDrafter:
        return ModelDrafter(self)


class ModelDrafter:
    """One generation's use of a draft model: its own KV cache, kept in step with the history.

    `tokens` are the tokens whose keys/values the cache holds (positions 0..len-1). Drafts the
    target rejected are dropped by writing again from the first position that differs: the
    cache's positions are explicit, and attention reads only up to the last one written.
    """

    def __init__(self, draft: DraftModel) -> None:
        self.draft = draft
        self.cache: SessionCache = draft.model.new_cache(draft.max_seq_len)
        self.tokens: list[int] = []

    def _logits(self, tokens: Sequence[int], start_pos: int) -> torch.Tensor:
        """Run tokens at start_pos..; logits (vocab,) after the last one."""
        model = self.draft.model
        device = next(model.parameters()).device
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
        with torch.inference_mode():
            hidden = model.run_blocks(model.embed(ids), start_pos, self.cache, model.blocks)
            return model.head(hidden[:, -1:])[0, -1]

    def propose(self, history: Sequence[int], k: int, sampler: Sampler) -> Draft:
        k = min(k, self.draft.max_seq_len - len(history))
        if k <= 0:
            return Draft()
        common = 0
        limit = min(len(self.tokens), len(history) - 1)  # always run at least the last token
        while common < limit and self.tokens[common] == history[common]:
            common += 1
        self.tokens = list(history)
        logits = self._logits(history[common:], common)
        context = list(history)
        draft = Draft(probs=None if sampler.params.temperature == 0 else [])
        for i in range(k):
            probs = sampler.distribution(logits, context)
            if probs is None:
                token = int(torch.argmax(sampler.adjusted(logits, context)))
            else:
                token = int(torch.multinomial(probs, 1, generator=sampler.generator))
                assert draft.probs is not None
                draft.probs.append(probs)
            draft.tokens.append(token)
            context.append(token)
            if i + 1 < k:  # the last draft's own logits are not needed
                logits = self._logits([token], len(context) - 1)
                self.tokens.append(token)
        return draft


def load_draft_model(
    path: str | Path,
    target_tokenizer: Any,
    target_vocab_size: int,
    device: torch.device,
    dtype: torch.dtype,
    max_seq_len: int,
) -> DraftModel:
    """Load a draft model (folder or GGUF) whole; refuse one whose vocabulary differs."""
    from cake.model.config import LlamaConfig, ModelFolderError
    from cake.model.gguf import resolve_model_path
    from cake.model.loader import load_llama
    from cake.model.tokenizer import load_tokenizer

    folder = resolve_model_path(path)
    config = LlamaConfig.from_folder(folder)
    fix = (
        "a draft model must use exactly the same tokenizer (e.g. a smaller model of the same "
        "family); or use --draft lookup"
    )
    if config.vocab_size != target_vocab_size:
        raise ModelFolderError(
            f"--draft {path}: its vocabulary has {config.vocab_size} tokens, the model's "
            f"{target_vocab_size}; {fix}"
        )
    tokenizer = load_tokenizer(folder)
    if tokenizer.get_vocab() != target_tokenizer.get_vocab():
        raise ModelFolderError(
            f"--draft {path}: its tokenizer maps tokens to other ids than the model's; {fix}"
        )
    log.info("loading draft model %s (%d blocks) on %s", folder, config.n_layers, device)
    model = load_llama(
        folder,
        range(config.n_layers),
        with_embedding=True,
        with_head=True,
        dtype=dtype,
        device=device,
        max_seq_len=max_seq_len,
        config=config,
    )
    return DraftModel(model, max_seq_len, str(path))
