"""Speculative decoding: verify several drafted tokens in one pass through the stages.

One round, with `history` ending in a token chosen but not yet run (position p = len - 1):

    forward [history[-1], d1 .. dk] at p        one round trip per stage, logits (1 + k, vocab)
    accept d1 .. dj, then one token of the model's own at p + j + 1
    roll every stage back to p + j + 1          the rejected d(j+1) .. dk are forgotten

so a round yields j + 1 tokens for one round trip per stage instead of one.

Acceptance is exact. Greedy: d(i+1) is accepted iff it is the token plain decoding would pick
after history + d1..di (the same `Sampler` call, repeat penalty included), and the extra token is
that pick, so the text is identical. Sampling: the standard rejection rule (Leviathan et al.
2023, Chen et al. 2023): accept d with probability min(1, p(d) / q(d)), else draw from
normalise(max(0, p - q)); p is the model's distribution after every sampling setting and q the
draft's (a point mass for a deterministic drafter), so each token's distribution is exactly p.

How many tokens to draft (`--draft-tokens auto`) is a bet: a round with k drafts costs
a + b * (1 + k) + c * k (a: round trips and fixed overhead, b: compute per position, c: drafting
per token, all measured as we go) and yields 1 + sum_i prod_{j<=i} alpha_j tokens (alpha_j: the
measured chance that draft j is accepted once j - 1 were). `DraftController` picks the k with
the most tokens per second, k = 0 (plain decoding) included.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, overload

import torch

from cake.decoding.draft import Draft, Drafter
from cake.decoding.sampling import Sampler

AUTO_MAX_DRAFT = 12  # most tokens `auto` drafts per round
MAX_DRAFT_TOKENS = 64  # most tokens --draft-tokens N may ask for
DRAFT_MODES = ("lookup", "model", "none")


@dataclass(frozen=True)
class DraftSettings:
    """What one generation drafts with: `mode` lookup|model|none, `tokens` N or None (auto)."""

    mode: str = "none"
    tokens: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in DRAFT_MODES:
            raise ValueError(
                f"draft mode must be one of {', '.join(DRAFT_MODES)}, not {self.mode!r}"
            )
        if self.tokens is not None and not 1 <= self.tokens <= MAX_DRAFT_TOKENS:
            raise ValueError(
                f"draft tokens must be 1..{MAX_DRAFT_TOKENS} or 'auto', not {self.tokens}"
            )

    @classmethod
    def from_options(cls, draft: str | None, tokens: str | int | None) -> DraftSettings:
        """--draft (none, "lookup" or a draft model's path) and --draft-tokens (N or auto)."""
        mode = "none" if draft is None else "lookup" if draft == "lookup" else "model"
        return cls(mode, parse_draft_tokens(tokens))

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


def request_draft(
    default: DraftSettings, mode: str | None, tokens: str | int | None, has_model: bool
) -> DraftSettings:
    """A request's drafting (the HTTP API's `cake_draft`, `cake_draft_tokens`) over the
    server's own (`--draft`, `--draft-tokens`)."""
    mode = default.mode if mode is None else mode
    if mode == "model" and not has_model:
        raise ValueError(
            "cake_draft 'model' needs a draft model: start the server with --draft PATH "
            "(or ask for 'lookup')"
        )
    count = default.tokens if tokens is None else parse_draft_tokens(tokens)
    return DraftSettings(mode, count)


def parse_draft_tokens(text: str | int | None) -> int | None:
    """`--draft-tokens`: 'auto' (None) or a count 1..MAX_DRAFT_TOKENS."""
    if text is None or (isinstance(text, str) and text.strip().lower() == "auto"):
        return None
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ValueError(f"draft tokens must be a whole number or 'auto', not {text!r}") from None
    if not 1 <= value <= MAX_DRAFT_TOKENS:
        raise ValueError(f"draft tokens must be 1..{MAX_DRAFT_TOKENS} or 'auto', not {value}")
    return value


def accept_draft(
    draft: Draft, logits: torch.Tensor, history: Sequence[int], sampler: Sampler
) -> list[int]:
    """The tokens a round yields: the accepted prefix of the draft, then one of the model's.

    logits: (1 + k, vocab); row i predicts the token after history + draft[:i].
    """
    out: list[int] = []
    context = sampler.context(history)  # grows with `out`: what each draw looks at
    for i, proposed in enumerate(draft.tokens):
        p = sampler.distribution(logits[i], context)
        if p is None:  # greedy: exactly the pick plain decoding makes here
            choice = sampler(logits[i], context)
            out.append(choice)
            context.append(choice)
            if choice != proposed:
                return out
            continue
        q = draft.probs[i] if draft.probs is not None else None
        q_token = float(q[proposed]) if q is not None else 1.0
        if sampler.accepts(float(p[proposed]), q_token):
            out.append(proposed)
            context.append(proposed)
            continue
        if q is not None:
            residual = torch.clamp(p - q.to(p.dtype), min=0)
        else:
            residual = p.clone()
            residual[proposed] = 0
        total = float(residual.sum())
        # p == q (or p is all on the rejected token, which then cannot be rejected): draw from p.
        out.append(sampler.draw(residual / total if total > 0 else p))
        return out
    out.append(sampler(logits[len(draft.tokens)], context))
    return out


class DraftController:
    """Chooses how many tokens to draft from measured acceptance and measured round costs."""

    DECAY = 0.9  # weight of older observations, per new one
    PRIOR_ACCEPT = 0.5  # before any evidence, a coin flip per draft position
    # While drafting does not pay, still try one token now and then (things change): after 8
    # rounds, then after twice as many each time the try did not pay either, up to 64, so a
    # costly drafter that never pays costs at most a few percent.
    FIRST_PROBE, LAST_PROBE = 8, 64
    MARGIN = 1.03  # drafting must promise 3% more tokens/s than plain decoding

    def __init__(self, fixed: int | None = None, max_tokens: int = AUTO_MAX_DRAFT) -> None:
        self.fixed = fixed
        self.max_tokens = fixed or max_tokens
        n = self.max_tokens
        self.reached = [1.0] * n  # decayed counts, per draft position: drafted there ...
        self.accepted = [self.PRIOR_ACCEPT] * n  # ... and accepted there
        self.tried = 0  # positions drafted at least once
        # Weighted least squares of round time against positions: sums of w, w*T, w*T^2, w*y, w*T*y.
        self.fit = [0.0] * 5
        self.per_position_prior: float | None = None
        self.draft_cost = 0.0  # seconds per drafted token (EMA)
        self.rounds_without = 0
        self.probe_every = self.FIRST_PROBE
        # What rounds really gave, tokens per second (EMA), with drafts and without: the model
        # above can be wrong (costs it does not see, a noisy machine); this is the check.
        self.rate_drafting: float | None = None
        self.rate_plain: float | None = None

    def observe_prefill(self, positions: int, seconds: float) -> None:
        """The prefill's cost per position: the slope until rounds of several sizes are seen."""
        if positions > 0 and seconds > 0:
            self.per_position_prior = seconds / positions

    def record(
        self, drafted: int, accepted: int, positions: int, seconds: float, draft_seconds: float
    ) -> None:
        for i in range(drafted):
            self.tried = max(self.tried, i + 1)
            self.reached[i] = self.reached[i] * self.DECAY + 1
            self.accepted[i] = self.accepted[i] * self.DECAY + (1 if i < accepted else 0)
        w, t, tt, y, ty = self.fit
        d = self.DECAY
        self.fit = [
            w * d + 1,
            t * d + positions,
            tt * d + positions * positions,
            y * d + seconds,
            ty * d + positions * seconds,
        ]
        rate = (1 + accepted) / max(seconds + draft_seconds, 1e-9)
        if drafted:
            self.rate_drafting = _ema(self.rate_drafting, rate)
        else:
            self.rate_plain = _ema(self.rate_plain, rate)
        if drafted:
            per_token = draft_seconds / drafted
            self.draft_cost = (
                per_token if not self.draft_cost else 0.8 * self.draft_cost + 0.2 * per_token
            )

    def round_cost(self) -> tuple[float, float]:
        """(a, b): seconds per round, and per position in it."""
        w, t, tt, y, ty = self.fit
        if w == 0:
            return 1.0, self.per_position_prior or 0.0
        spread = w * tt - t * t
        if spread > 1e-6 * w * w:
            b = max((w * ty - t * y) / spread, 0.0)
        else:
            b = self.per_position_prior or 0.0
        a = max((y - b * t) / w, 0.0)
        return a, b

    def expected_tokens(self, k: int) -> float:
        total, chain = 1.0, 1.0
        for i in range(k):
            # A position never drafted yet is taken to behave like the deepest one tried (a
            # copied passage goes on being copied), so k can grow as fast as the evidence.
            j = min(i, self.tried - 1) if self.tried else i
            chain *= self.accepted[j] / self.reached[j]
            total += chain
        return total

    def choose(self) -> int:
        if self.fixed is not None:
            return self.fixed
        a, b = self.round_cost()
        plain = 1.0 / max(a + b, 1e-9)
        best, best_rate = 0, plain * self.MARGIN
        for k in range(1, self.max_tokens + 1):
            rate = self.expected_tokens(k) / max(a + b * (1 + k) + self.draft_cost * k, 1e-9)
            if rate > best_rate:
                best, best_rate = k, rate
        measured_loss = (
            self.rate_drafting is not None
            and self.rate_plain is not None
            and self.rate_drafting < self.rate_plain
        )
        if best > 0 and not measured_loss:
            self.rounds_without = 0
            self.probe_every = self.FIRST_PROBE
            return best
        self.rounds_without += 1
        if self.rounds_without < self.probe_every:
            return 0
        self.rounds_without = 0
        self.probe_every = min(self.probe_every * 2, self.LAST_PROBE)
        return max(best, 1)


def _ema(old: float | None, new: float, weight: float = 0.2) -> float:
    return new if old is None else (1 - weight) * old + weight * new


class Verifier(Protocol):
    """The model's side of a round: run positions through every stage, forget rejected ones."""

    async def forward(self, tokens: Sequence[int], start_pos: int) -> torch.Tensor:
        """Logits (len(tokens), vocab) for tokens at start_pos.."""
        ...

    async def rollback(self, length: int) -> None:
        """Every stage keeps positions 0..length-1 only."""
        ...


class DraftCounts(Protocol):
    """Where a round adds up what it drafted and what the model accepted (GenerationStats)."""

    drafted: int
    accepted: int
    drafted_ahead: int  # rounds whose draft was made during the previous round's trips


class Speculation:
    """One generation's drafting: a drafter, a controller and the counts for --stats.

    With `draft_ahead` (a draft model, greedy, remote stages), the next round's draft is made
    while this round's verification is on the network: it assumes every draft is accepted and
    the model's own next token is the drafter's guess for it. When that holds, the next round
    starts at once, so drafting time hides behind the round trips (verification pipelined with
    drafting); when it does not, that draft is dropped and the drafter catches up as usual.
    """

    def __init__(
        self,
        drafter: Drafter,
        controller: DraftController,
        offload: bool = False,
        draft_ahead: bool = False,
    ) -> None:
        self.drafter = drafter
        self.controller = controller
        # A draft model's forwards run in a thread when the event loop serves other sessions
        # (the HTTP API), like the master's own tensor work.
        self.offload = offload
        self.draft_ahead = draft_ahead
        # The next round's draft made ahead: (the history length it assumed, the tokens that
        # history ends with, the draft). The generation only appends a round's tokens, so a
        # history of that length ending so is the one assumed.
        self.ahead: tuple[int, tuple[int, ...], Draft] | None = None

    async def _propose(self, history: Sequence[int], k: int, sampler: Sampler) -> Draft:
        settled = len(history)  # the generation's own history: every token of it is final
        if self.offload:
            return await asyncio.to_thread(self.drafter.propose, history, k, sampler, settled)
        return self.drafter.propose(history, k, sampler, settled)

    async def round(
        self,
        verifier: Verifier,
        history: Sequence[int],
        sampler: Sampler,
        budget: int,
        stats: DraftCounts,
    ) -> list[int]:
        """Run history[-1] plus up to `budget` drafted tokens; the 1.. budget + 1 tokens chosen."""
        k = min(self.controller.choose(), budget)
        ahead_on = self.draft_ahead and sampler.params.temperature == 0
        draft, guess, draft_s = Draft(), None, 0.0
        ahead, self.ahead = self.ahead, None
        if k > 0:
            started = time.perf_counter()
            if ahead is not None and len(ahead[2].tokens) > k and _ends_as(history, ahead):
                full = ahead[2]
                stats.drafted_ahead += 1
            else:
                full = await self._propose(history, k + 1 if ahead_on else k, sampler)
            draft = Draft(full.tokens[:k], full.probs[:k] if full.probs is not None else None)
            if ahead_on and len(full.tokens) > k:
                guess = full.tokens[k]
            draft_s = time.perf_counter() - started
        start_pos = len(history) - 1
        started = time.perf_counter()
        forward = asyncio.ensure_future(verifier.forward([history[-1], *draft.tokens], start_pos))
        drafting: asyncio.Future[Draft] | None = None
        if guess is not None:
            assumed = Extended(history, [*draft.tokens, guess])
            drafting = asyncio.ensure_future(
                asyncio.to_thread(self.drafter.propose, assumed, k + 1, sampler, len(history))
            )
        try:
            logits = await forward
        finally:
            elapsed = time.perf_counter() - started
            next_draft = await drafting if drafting is not None else None  # the drafter is free
            draft_s += time.perf_counter() - started - elapsed  # waited for it beyond the trip
        tokens = accept_draft(draft, logits, history, sampler)
        accepted = len(tokens) - 1
        if next_draft is not None and tokens == [*draft.tokens, guess]:
            self.ahead = (len(history) + len(tokens), tuple(tokens), next_draft)
        if accepted < len(draft.tokens):
            await verifier.rollback(start_pos + 1 + accepted)
        self.controller.record(len(draft.tokens), accepted, 1 + len(draft.tokens), elapsed, draft_s)
        stats.drafted += len(draft.tokens)
        stats.accepted += accepted
        return tokens


def _ends_as(history: Sequence[int], ahead: tuple[int, tuple[int, ...], Draft]) -> bool:
    length, tail, _ = ahead
    return len(history) == length and tuple(history[length - len(tail) :]) == tail


class Extended(Sequence[int]):
    """`base` followed by `extra`, without copying `base` (a generation's whole history): what
    a draft made ahead assumes the history will be."""

    def __init__(self, base: Sequence[int], extra: Sequence[int]) -> None:
        self.base, self.extra = base, list(extra)

    def __len__(self) -> int:
        return len(self.base) + len(self.extra)

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> list[int]: ...

    def __getitem__(self, index: int | slice) -> int | list[int]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        split = len(self.base)
        return self.base[index] if index < split else self.extra[index - split]
