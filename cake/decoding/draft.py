"""Drafters: cheap guesses of the next few tokens, for speculative decoding to verify.

A drafter proposes up to k tokens that follow `history` (every token so far, the prompt
included). The model then checks all of them in one forward (cake/decoding/speculative.py), so a
good guess saves round trips and a bad one costs only the extra positions in that forward.

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
from cake.errors import ModelFolderError
from cake.model.kv_cache import SessionCache
from cake.model.llama import Llama
from cake.model.opener import Compute, open_model

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
    """Per generation: proposes continuations of the accepted history.

    `settled`: how many leading tokens of `history` are final (the generation will never
    change them); a history a draft made ahead assumes is final only up to the real one. A
    drafter's work per call follows the tokens since it last looked, not the history's length.
    """

    def propose(
        self, history: Sequence[int], k: int, sampler: Sampler, settled: int | None = None
    ) -> Draft: ...


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
        # A generation's history only grows, so what was indexed stays true: index the new
        # tokens. A history that is not that (shorter, or another last known token) starts over.
        seen = len(self.tokens)
        if len(history) < seen or (seen and history[seen - 1] != self.tokens[-1]):
            self.__init__(max(self.ngram_sizes), min(self.ngram_sizes))
        self.tokens.extend(history[len(self.tokens) :])
        # Index every n-gram that ends before the last token: the n-gram ending at the last token
        # is what we look up, and its own occurrence must not match itself.
        for end in range(self.indexed, len(self.tokens) - 1):
            for n in self.ngram_sizes:
                if end + 1 >= n:
                    self.last_seen[n][tuple(self.tokens[end + 1 - n : end + 1])] = end
        self.indexed = max(self.indexed, len(self.tokens) - 1)

    def propose(
        self, history: Sequence[int], k: int, sampler: Sampler, settled: int | None = None
    ) -> Draft:
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
        self.tokens: list[int] = []  # the tokens whose keys/values the cache holds
        self.settled = 0  # tokens[:settled] came from final history: never compared again

    def _logits(self, tokens: Sequence[int], start_pos: int) -> torch.Tensor:
        """Run tokens at start_pos..; logits (vocab,) after the last one."""
        model = self.draft.model
        device = next(model.parameters()).device
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
        with torch.inference_mode():
            hidden = model.run_blocks(model.embed(ids), start_pos, self.cache, model.blocks)
            return model.head(hidden[:, -1:])[0, -1]

    def propose(
        self, history: Sequence[int], k: int, sampler: Sampler, settled: int | None = None
    ) -> Draft:
        k = min(k, self.draft.max_seq_len - len(history))
        if k <= 0:
            return Draft()
        common = self._common_prefix(history)
        del self.tokens[common:]
        self.tokens.extend(history[common:])
        self.settled = len(history) if settled is None else settled
        logits = self._logits(history[common:], common)
        context = sampler.context(history)
        draft = Draft(probs=None if sampler.params.temperature == 0 else [])
        for i in range(k):
            token, probs = sampler.pick(logits, context)
            if probs is not None:
                assert draft.probs is not None
                draft.probs.append(probs)
            draft.tokens.append(token)
            context.append(token)
            if i + 1 < k:  # the last draft's own logits are not needed
                logits = self._logits([token], len(history) + i)
                self.tokens.append(token)
        return draft

    def _common_prefix(self, history: Sequence[int]) -> int:
        """Positions the cache holds that `history` starts with (at most all but its last
        token, which always runs). Tokens settled in an earlier call are final, so only the
        ones after them are compared."""
        limit = min(len(self.tokens), len(history) - 1)
        common = min(self.settled, limit)
        while common < limit and self.tokens[common] == history[common]:
            common += 1
        return common


def load_draft_model(
    path: str | Path, target_tokenizer: Any, target_vocab_size: int, compute: Compute
) -> DraftModel:
    """Load a draft model (folder, GGUF or hub name) whole, as the master computes (`compute`: its
    device, dtype and context, no --quantize); refuse one whose vocabulary differs."""
    draft = open_model(path)
    config = draft.config
    fix = (
        "a draft model must use exactly the same tokenizer (e.g. a smaller model of the same "
        "family); or use --draft lookup"
    )
    if config.vocab_size != target_vocab_size:
        raise ModelFolderError(
            f"--draft {path}: its vocabulary has {config.vocab_size} tokens, the model's "
            f"{target_vocab_size}; {fix}"
        )
    if draft.tokenizer().get_vocab() != target_tokenizer.get_vocab():
        raise ModelFolderError(
            f"--draft {path}: its tokenizer maps tokens to other ids than the model's; {fix}"
        )
    log.info(
        "loading draft model %s (%d blocks) on %s", draft.folder, config.n_layers, compute.device
    )
    whole = Compute(compute.device, compute.dtype, None, compute.max_seq_len)
    model = draft.load(whole, range(config.n_layers), with_ends=True)
    return DraftModel(model, compute.max_seq_len, str(path))
