"""What a generation took: tokens, prefill and decode time, drafting, and each stage's share
(`--stats` prints them; the API reports the counts as usage)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cake.decoding.logprobs import TokenLogprobs
from cake.engine.stages import StageTimes


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt's, taken from a cached prefix (not computed)
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0  # decode forwards (one round trip per remote stage each)
    decode_tokens: int = 0  # tokens those forwards chose (more than one each with drafting)
    drafted: int = 0  # speculative decoding: tokens proposed by the drafter ...
    accepted: int = 0  # ... and accepted by the model
    drafted_ahead: int = 0  # rounds whose draft was made during the previous round's trips
    finish_reason: str = ""  # "stop" (an EOS token, or a grammar complete) or "length"
    # With `logprobs` asked of the generation: one entry per yielded token, in order, appended
    # before the token is yielded (so a consumer reads logprobs[i] as it gets token i).
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    stages: dict[str, StageTimes] = field(default_factory=dict)

    @property
    def prefill_tok_s(self) -> float:
        computed = self.prompt_tokens - self.cached_tokens
        return computed / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def round_trips(self) -> int:
        return sum(t.round_trips for t in self.stages.values())

    def summary(self) -> str:
        cached = f" ({self.cached_tokens} cached)" if self.cached_tokens else ""
        line = (
            f"prompt tokens: {self.prompt_tokens}{cached}, new tokens: {self.new_tokens}, "
            f"prefill: {self.prefill_tok_s:.1f} tok/s, decode: {self.decode_tok_s:.1f} tok/s"
        )
        tokens = self.decode_tokens + 1 if self.prompt_tokens else 0
        if self.round_trips and tokens:
            line += f", round trips/token: {self.round_trips / tokens:.2f}"
        if self.drafted:
            line += (
                f", drafted: {self.drafted}, accepted: {self.accepted} "
                f"({self.accepted / self.drafted:.0%}), tokens/round trip: "
                f"{self.decode_tokens / max(self.decode_steps, 1):.2f}"
            )
        return line

    def stage_lines(self) -> list[str]:
        steps = max(self.decode_tokens + 1, 1)
        return [
            f"stage {label}: compute {t.compute_s / steps * 1e3:.2f} ms/token, "
            f"wire {t.wire_s / steps * 1e3:.2f} ms/token, {t.round_trips} round trips"
            for label, t in self.stages.items()
        ]


def describe_expert_load(rows: list[int]) -> str:
    """One stage's expert load balance for --stats: '7 of 8 experts used; busiest #3 with 21%
    of routed rows, idlest #5 with 0% (an even load is 12.5% each)'."""
    total = sum(rows)
    if not total:
        return f"{len(rows)} experts, none routed to yet"
    used = sum(1 for count in rows if count)
    busiest = max(range(len(rows)), key=rows.__getitem__)
    idlest = min(range(len(rows)), key=rows.__getitem__)
    return (
        f"{used} of {len(rows)} experts used; busiest #{busiest} with "
        f"{rows[busiest] / total:.1%} of routed rows, idlest #{idlest} with "
        f"{rows[idlest] / total:.1%} (an even load is {1 / len(rows):.1%} each)"
    )
