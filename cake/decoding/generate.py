"""The generate loop: prefill, then decode steps (or speculative rounds) until a stop.

Each step is a short function, so the loop reads as the list of what happens:

    prefill(session, prompt)                    the prompt's positions; logits of the last
    decode_one_token(session, token, pos)       one position; its logits
    speculative_round(session, ...)             one position plus drafted ones, verified at once
    Generator.generate(...)                     the loop: sample, yield, stop, next step

A generation with a grammar (cake/decoding/grammar.py) masks each position's logits to the
tokens the grammar allows before the draw, and ends ("stop") once the grammar is complete; one
that asks for logprobs records them beside its tokens (GenerationStats.logprobs). Both decode
one token per step: speculative decoding is off for them (a drafted token's mask and logprobs
would need the matcher advanced along the draft, and undone on a rejection).

Every forward goes through the session (cake/engine/session.py), so through the one step
scheduler: a generation's steps are batched with whatever else the master runs, and a
verification row carries its drafted positions like any other row.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cake.decoding.draft import Drafter, DraftModel, LookupDrafter
from cake.decoding.grammar import GrammarMatcher, GrammarSpec
from cake.decoding.logprobs import token_logprobs
from cake.decoding.sampling import Sampler, SamplingParams
from cake.decoding.speculative import DraftController, DraftSettings, Speculation
from cake.decoding.stats import GenerationStats
from cake.engine.compute import MasterCompute
from cake.engine.prefix_cache import CachedPrefix, PrefixCache
from cake.engine.scheduler import StepScheduler
from cake.engine.session import Output, Session
from cake.errors import ContextError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationOptions:
    """What a caller asks of a generation, besides its prompt (the CLI's -n, --ignore-eos and
    sampling options, once for every turn of a chat)."""

    params: SamplingParams
    max_new_tokens: int
    ignore_eos: bool = False


async def prefill(session: Session, prompt_ids: Sequence[int], cached: int = 0) -> torch.Tensor:
    """The prompt's positions from `cached` on (those before are a cached prefix the session
    started from); logits (vocab,) after its last token."""
    return await session.forward(prompt_ids[cached:], cached)


async def decode_one_token(session: Session, token: int, position: int) -> torch.Tensor:
    """`token` at `position`; logits (vocab,) for the position after it."""
    return await session.forward([token], position)


class _Verifier:
    """What a speculative round needs of the session: every position's logits, and rollback."""

    def __init__(self, session: Session) -> None:
        self.session = session

    async def forward(self, tokens: Sequence[int], start_pos: int) -> torch.Tensor:
        return await self.session.forward(tokens, start_pos, Output.ALL_LOGITS)

    async def rollback(self, length: int) -> None:
        await self.session.rollback(length)


async def speculative_round(
    session: Session,
    speculation: Speculation,
    history: Sequence[int],
    sampler: Sampler,
    budget: int,
    stats: GenerationStats,
) -> list[int]:
    """history[-1] plus up to `budget` drafted tokens in one forward; the 1..budget + 1 tokens
    chosen (accepted drafts, then the model's own), all but the last already in the caches."""
    return await speculation.round(_Verifier(session), history, sampler, budget, stats)


class _Choice:
    """One position's draw for a generation: the grammar's mask before it, the matcher advanced
    and the logprobs recorded after it. A plain generation's draw is the sampler's alone."""

    def __init__(
        self,
        stop_ids: frozenset[int],
        matcher: GrammarMatcher | None,
        logprobs: int | None,
        stats: GenerationStats,
    ) -> None:
        self.stop_ids = stop_ids
        self.matcher = matcher
        self.logprobs = logprobs
        self.stats = stats

    def __call__(self, sampler: Sampler, logits: torch.Tensor, history: Sequence[int]) -> int:
        allowed = logits if self.matcher is None else self.matcher.constrain(logits)
        token = sampler(allowed, history)
        if self.matcher is not None and token not in self.stop_ids:
            self.matcher.advance(token)
        if self.logprobs is not None:
            self.stats.logprobs.append(token_logprobs(logits, token, self.logprobs))
        return token


class Generator:
    """Tokens from a model's logits, for every caller of one master (CLI, API, chat)."""

    def __init__(
        self,
        scheduler: StepScheduler,
        stop_ids: Collection[int],
        max_seq_len: int,
        trained_positions: int,
        compute: MasterCompute,
        drafting: DraftSettings,
        draft_model: DraftModel | None = None,
        tokenizer: Any = None,
        prefixes: PrefixCache | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.prefixes = prefixes  # finished sessions kept for reuse (None: --no-prefix-cache)
        self.stop_ids = frozenset(stop_ids)
        self.max_seq_len = max_seq_len
        self.trained_positions = trained_positions  # for the context error's hint
        self.compute = compute
        self.drafting = drafting  # what a generation drafts with unless told otherwise
        self.draft_model = draft_model
        self.tokenizer = tokenizer  # what a grammar is compiled for

    async def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        max_new_tokens: int,
        ignore_eos: bool = False,
        stats: GenerationStats | None = None,
        draft: DraftSettings | None = None,
        *,
        grammar: GrammarSpec | None = None,
        logprobs: int | None = None,
    ) -> AsyncIterator[int]:
        """Yield new token ids (stop tokens are not yielded) until EOS, the grammar's end or a
        length limit.

        `draft` (default: the master's) turns on speculative decoding: same greedy text, same
        sampling distribution, fewer round trips (see cake/decoding/speculative.py); not with
        `grammar` or `logprobs`. `grammar`: the text must match it (GrammarError if it cannot
        be compiled). `logprobs`: record each token's log-probability and that many top
        alternatives (0..20) in `stats.logprobs`.
        """
        stats = stats if stats is not None else GenerationStats()
        one_token_a_step = grammar is not None or logprobs is not None
        speculation = None if one_token_a_step else self._speculation(draft or self.drafting)
        self._check_prompt(prompt_ids)
        matcher = await self._matcher(grammar) if grammar is not None else None
        choose = _Choice(self.stop_ids, matcher, logprobs, stats)
        session = self.scheduler.open_session()
        stats.stages = session.stage_times
        stats.prompt_tokens = len(prompt_ids)
        stats.finish_reason = "length"
        sampler = Sampler(params)
        history = list(prompt_ids)
        keep = False  # whether the session's caches stay as a cached prefix when it ends
        try:
            started = time.perf_counter()
            stats.cached_tokens = await self._start_from_cache(session, prompt_ids)
            logits = await prefill(session, prompt_ids, stats.cached_tokens)
            stats.prefill_s = time.perf_counter() - started
            if speculation is not None:
                computed = len(prompt_ids) - stats.cached_tokens
                speculation.controller.observe_prefill(computed, stats.prefill_s)
            started = time.perf_counter()
            pending = [await self._sample(sampler, logits, history, choose)]  # not yet yielded
            while pending:
                token = pending.pop(0)
                if token in self.stop_ids and (not ignore_eos or matcher is not None):
                    stats.finish_reason = "stop"
                    del stats.logprobs[stats.new_tokens :]  # the stop token's, never yielded
                    break
                history.append(token)
                stats.new_tokens += 1
                yield token
                if matcher is not None and matcher.done:
                    stats.finish_reason = "stop"
                    break
                if self._at_limit(history, stats, max_new_tokens):
                    break
                if pending:  # accepted drafts: already in every stage's caches
                    continue
                budget = min(max_new_tokens - stats.new_tokens - 1, self.max_seq_len - len(history))
                pending = await self._next_tokens(
                    session, sampler, speculation, history, budget, stats, choose
                )
                stats.decode_steps += 1
                stats.decode_tokens += len(pending)
                stats.decode_s = time.perf_counter() - started
            keep = True
        except GeneratorExit:  # the caller stopped early (a stop string): the caches are whole
            keep = True
            raise
        finally:
            await self._end_session(session, keep)

    async def _start_from_cache(self, session: Session, prompt_ids: Sequence[int]) -> int:
        """Start the new session from the cached prefix sharing the most of the prompt (see
        cake/engine/prefix_cache.py): the prompt positions it holds (0: none, compute all)."""
        if self.prefixes is None:
            return 0
        match = self.prefixes.lookup(prompt_ids, session.epoch)
        if match is None:
            return 0
        # A session that holds all the entry's tokens makes the entry redundant: it takes the
        # entry's caches on every stage instead of a copy (no other request forks it now).
        move = match.length == len(match.entry.tokens)
        if move:
            self.prefixes.remove(match.entry.session_id)
        if await session.start_from(match.entry, match.length, move):
            return match.length
        # A stage lost it (evicted there, a restarted worker): no later request finds it.
        self.prefixes.remove(match.entry.session_id)
        await self.scheduler.pipeline.close_session(match.entry.session_id)
        return 0

    async def _end_session(self, session: Session, keep: bool) -> None:
        """Close the session everywhere, or keep it as a cached prefix (closing those the
        prefix cache lets go of to make room)."""
        prefixes = self.prefixes
        if not await session.close(keep=keep and prefixes is not None) or prefixes is None:
            return
        entry = CachedPrefix(session.id, session.tokens, session.forwards, session.epoch)
        for session_id in prefixes.add(entry):
            await self.scheduler.pipeline.close_session(session_id)

    async def _next_tokens(
        self,
        session: Session,
        sampler: Sampler,
        speculation: Speculation | None,
        history: list[int],
        budget: int,
        stats: GenerationStats,
        choose: _Choice,
    ) -> list[int]:
        """The tokens one decode step chooses: one, or with drafting the accepted drafts and one."""
        if speculation is not None:
            return await speculative_round(session, speculation, history, sampler, budget, stats)
        logits = await decode_one_token(session, history[-1], len(history) - 1)
        return [await self._sample(sampler, logits, history, choose)]

    def _check_prompt(self, prompt_ids: Sequence[int]) -> None:
        if not prompt_ids:
            raise ContextError("the prompt is empty")
        if len(prompt_ids) >= self.max_seq_len:
            raise ContextError(
                f"the prompt has {len(prompt_ids)} tokens, but the context holds "
                f"{self.max_seq_len}; shorten it or raise --max-seq-len "
                f"(the model allows up to {self.trained_positions})"
            )

    def _at_limit(self, history: list[int], stats: GenerationStats, max_new_tokens: int) -> bool:
        if stats.new_tokens >= max_new_tokens:
            return True
        if len(history) >= self.max_seq_len:
            log.warning("context full (%d tokens): stopping", self.max_seq_len)
            return True
        return False

    async def _sample(
        self, sampler: Sampler, logits: torch.Tensor, history: list[int], choose: _Choice
    ) -> int:
        if self.compute.offload:  # the HTTP API: other requests' events go on meanwhile
            return await asyncio.to_thread(choose, sampler, logits, history)
        return choose(sampler, logits, history)

    async def _matcher(self, grammar: GrammarSpec) -> GrammarMatcher:
        """The generation's matcher (compiling the grammar if no request did yet: up to a few
        hundred ms, so on a thread where the event loop serves others)."""
        if self.tokenizer is None:
            raise ValueError("this generator has no tokenizer to compile a grammar for")
        if self.compute.offload:
            return await asyncio.to_thread(
                GrammarMatcher.start, grammar, self.tokenizer, self.stop_ids
            )
        return GrammarMatcher.start(grammar, self.tokenizer, self.stop_ids)

    def _speculation(self, settings: DraftSettings) -> Speculation | None:
        if not settings.enabled:
            return None
        if settings.mode == "lookup":
            drafter: Drafter = LookupDrafter()
        elif self.draft_model is not None:
            drafter = self.draft_model.drafter()
        else:
            raise ValueError("no draft model is loaded: start with --draft PATH, or use lookup")
        model = settings.mode == "model"
        offload = self.compute.offload and model  # lookup is too cheap for a thread
        # Drafting the next round during this one's round trips pays where there are round
        # trips; with every block here it would only compete with the verification for cores.
        draft_ahead = model and self.scheduler.pipeline.remote_stages > 0
        return Speculation(drafter, DraftController(settings.tokens), offload, draft_ahead)
