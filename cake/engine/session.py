"""A session on the master: one sequence (a generation, a perplexity window) from its first step
to its close, and the one owner of its lifetime.

A session has an id that every stage keys its caches by (the master's store, each worker's),
and it alone opens and ends them: `forward` runs its next positions through the step scheduler
(which carries them in a step with other sessions' rows), `rollback` forgets positions on every
stage (speculative decoding's rejected drafts), `close` leaves the scheduler and closes the
session on every stage.

It also keeps what it fed, one entry per forward as it was sent. When the stages are replaced
(a re-plan after a worker was lost for good, cake/engine/pipeline.py), the session runs those
forwards again on the new stages before its next one, exactly as they ran, so the caches it
rebuilds are the ones it had bit for bit (quantized kernels round a many-row product
differently from one row: a single re-prefill of the whole history flipped a greedy near-tie 80
tokens later); then it carries on. That costs as many steps as the session had run.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from cake.errors import StagesReplaced, WorkerError, WorkerGone

if TYPE_CHECKING:  # annotations only: no import at run time
    import torch

    from cake.engine.pipeline import Pipeline
    from cake.engine.prefix_cache import CachedPrefix
    from cake.engine.stages import StageTimes

MAX_RESUMES = 3  # re-plans one step may wait for before it gives up (each lost another worker)


class Output(enum.Enum):
    """What a forward gives back."""

    NOTHING = "nothing"  # a replayed forward, or a prompt's chunk before the last
    LAST_LOGITS = "last_logits"  # float32 logits (vocab,) after the last position
    ALL_LOGITS = "all_logits"  # float32 logits (T, vocab), one per position (verifying drafts)
    HIDDEN = "hidden"  # hidden states (1, T, C) after the last stage (perplexity's own head)


class Steps(Protocol):
    """The step scheduler, as a session uses it (cake/engine/scheduler.py)."""

    async def run(
        self, session: Session, tokens: Sequence[int], start_pos: int, output: Output
    ) -> torch.Tensor | None: ...

    async def leave(self, session_id: str) -> None: ...


class Session:
    def __init__(self, steps: Steps, pipeline: Pipeline) -> None:
        self.id = uuid.uuid4().hex
        self.stage_times: dict[str, StageTimes] = {}  # label -> where that stage's time went
        self._steps = steps
        self._pipeline = pipeline
        self._fed: list[int] = []  # the tokens at positions 0..length-1 of the caches
        self._forwards: list[int] = []  # positions each forward fed, in order
        self.epoch = pipeline.epoch  # the stages the caches are on
        self.closed = False

    @property
    def length(self) -> int:
        """Positions the caches hold."""
        return len(self._fed)

    @property
    def stale(self) -> bool:
        """The stages were replaced since this session's last step."""
        return self.epoch != self._pipeline.epoch

    async def forward(
        self, tokens: Sequence[int], start_pos: int, output: Output = Output.LAST_LOGITS
    ) -> torch.Tensor:
        """Run `tokens` at start_pos.. (start_pos <= length: an earlier start rolls back first)
        and give back `output`. On stages replaced since the last step, the session's earlier
        forwards run there first; a worker lost for good re-plans (if the master planned its
        cluster) and the step runs again."""
        if start_pos > self.length:
            raise ValueError(
                f"start_pos {start_pos} skips positions: the session holds {self.length}"
            )
        for _ in range(MAX_RESUMES + 1):
            try:
                if self.stale:
                    self.epoch = self._pipeline.epoch
                    await self._run_again()
                result = await self._steps.run(self, tokens, start_pos, output)
                self._record(tokens, start_pos)
                return result
            except (WorkerGone, StagesReplaced) as exc:
                await self._pipeline.recover(exc, self.epoch)
        raise WorkerError(f"gave up after {MAX_RESUMES} re-plans in one step")

    @property
    def tokens(self) -> tuple[int, ...]:
        """The tokens at positions 0..length-1 of the caches."""
        return tuple(self._fed)

    @property
    def forwards(self) -> tuple[int, ...]:
        """Positions each forward fed, in order (their sum is `length`)."""
        return tuple(self._forwards)

    async def start_from(self, prefix: CachedPrefix, length: int, move: bool = False) -> bool:
        """Open this new session on every stage as a copy of the cached `prefix`'s first
        `length` positions (cake/engine/prefix_cache.py), or with `move` by taking its caches;
        False if a stage no longer holds it (nothing is opened then: the session starts empty,
        as usual)."""
        if self._fed:
            raise ValueError("only a new session starts from a cached prefix")
        if prefix.epoch != self._pipeline.epoch or self.stale:
            return False
        if not await self._pipeline.fork_session(self.id, prefix.session_id, length, move):
            return False
        self._fed = list(prefix.tokens[:length])
        self._forwards = list(prefix.forwards)
        self._truncate(length)
        return True

    async def rollback(self, length: int) -> None:
        """Keep positions 0..length-1 only, here and on every stage."""
        self._truncate(length)
        await self._pipeline.rollback(self.id, length)

    async def close(self, keep: bool = False) -> bool:
        """Leave the scheduler (once no step in flight carries this session), then free the
        session's caches on every stage, or with `keep` keep them there as a cached prefix
        (unless the stages were replaced meanwhile). Whether they were kept."""
        if self.closed:
            return False
        self.closed = True
        await self._steps.leave(self.id)
        keep = keep and not self.stale and bool(self._fed)
        await self._pipeline.close_session(self.id, keep)
        return keep

    def _record(self, tokens: Sequence[int], start_pos: int) -> None:
        self._truncate(start_pos)
        self._fed.extend(tokens)
        self._forwards.append(len(tokens))

    def _truncate(self, length: int) -> None:
        """Forget positions >= length, and the forwards (or their ends) that fed them."""
        del self._fed[length:]
        kept = 0
        for index, count in enumerate(self._forwards):
            if kept + count >= length:
                self._forwards[index:] = [length - kept] if length > kept else []
                return
            kept += count

    async def _run_again(self) -> None:
        position = 0
        for count in list(self._forwards):
            tokens = self._fed[position : position + count]
            await self._steps.run(self, tokens, position, Output.NOTHING)
            position += count
