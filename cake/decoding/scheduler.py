"""Continuous batching: one step through every stage for the next rows of all active sessions.

Each generation (`Master.generate`) still reads as one session's loop: it asks for the logits
of its next tokens and awaits them. The scheduler gathers what the sessions of a *group* ask
for into one step: one embedding, one forward per stage (a single frame per worker, whatever
the number of sessions), one head. Decode is memory-bound, so a step for eight sessions reads
each weight once and costs little more than a step for one.

Sessions join and leave between steps. A long prompt is cut into chunks of `prefill_chunk`
positions, one per step, so a new request's prefill never stalls the others' decode for long.

With several stages, sessions are spread over `groups` disjoint groups that step on their own:
while one group is on the second worker, the next can be on the first (vLLM's pipelining).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from cake.engine.stages import BatchRow, Stage, StageTimes

if TYPE_CHECKING:
    from cake.master import GenerationStats

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 128  # positions of one prompt per step
DEFAULT_GATHER_S = 0.003  # how long a step waits for members that have not asked yet


@dataclass
class _Row:
    session_id: str
    tokens: list[int]
    start_pos: int
    stats: GenerationStats
    future: asyncio.Future[torch.Tensor]


@dataclass
class _Group:
    members: set[str] = field(default_factory=set)
    queue: dict[str, _Row] = field(default_factory=dict)  # session -> the row it waits on
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: set[str] = field(default_factory=set)
    step_done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None


class StepScheduler:
    def __init__(
        self,
        embed: Callable[[torch.Tensor], torch.Tensor],
        stages: Sequence[Stage],
        head: Callable[[torch.Tensor], torch.Tensor],
        run_local: Callable[..., object],
        device: torch.device,
        groups: int = 1,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        gather_s: float = DEFAULT_GATHER_S,
    ) -> None:
        """`run_local(fn, *args)` awaits the master's own tensor work (inline or in a thread)."""
        if groups < 1 or prefill_chunk < 1:
            raise ValueError("groups and prefill_chunk must be at least 1")
        self.embed, self.stages, self.head = embed, list(stages), head
        self.run_local = run_local
        self.device = device
        self.prefill_chunk = prefill_chunk
        self.gather_s = gather_s
        self.groups = [_Group() for _ in range(groups)]
        self._group_of: dict[str, _Group] = {}
        self.steps = 0  # batched steps run, for stats and tests
        self.rows = 0  # session rows carried by those steps

    # ---------------------------------------------------------------- membership

    def join(self, session_id: str) -> None:
        group = min(self.groups, key=lambda g: len(g.members))
        group.members.add(session_id)
        self._group_of[session_id] = group
        if group.task is None or group.task.done():
            group.task = asyncio.create_task(self._run(group))

    async def leave(self, session_id: str) -> None:
        """Forget a session; return once no step in flight still carries it, so the caller can
        close its caches on every stage without racing that step."""
        group = self._group_of.pop(session_id, None)
        if group is None:
            return
        group.members.discard(session_id)
        group.queue.pop(session_id, None)
        group.wake.set()  # the gather may have been waiting for this member
        while session_id in group.in_flight:
            group.step_done.clear()
            await group.step_done.wait()

    async def close(self) -> None:
        for group in self.groups:
            if group.task is not None:
                group.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await group.task

    # ---------------------------------------------------------------- asking for logits

    async def logits(
        self, session_id: str, token_ids: Sequence[int], start_pos: int, stats: GenerationStats
    ) -> torch.Tensor:
        """Logits (vocab,) after the last of `token_ids`, placed at start_pos onwards; a long
        prompt goes through in chunks, one step each."""
        group = self._group_of[session_id]
        tokens = list(token_ids)
        result: torch.Tensor | None = None
        for offset in range(0, len(tokens), self.prefill_chunk):
            chunk = tokens[offset : offset + self.prefill_chunk]
            future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
            group.queue[session_id] = _Row(session_id, chunk, start_pos + offset, stats, future)
            group.wake.set()
            try:
                result = await future
            except asyncio.CancelledError:
                group.queue.pop(session_id, None)
                raise
        assert result is not None, "no tokens to run"
        return result

    # ---------------------------------------------------------------- the step loop

    async def _run(self, group: _Group) -> None:
        loop = asyncio.get_running_loop()
        while group.members or group.queue:
            await group.wake.wait()
            group.wake.clear()
            if not group.queue:
                continue
            # Gather: every member asks for its next row within a few loop turns of the last
            # step's results; wait for the stragglers a little, never long.
            deadline = loop.time() + self.gather_s
            while len(group.queue) < len(group.members):
                left = deadline - loop.time()
                if left <= 0:
                    break
                group.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(group.wake.wait(), left)
            rows = list(group.queue.values())
            group.queue.clear()
            if not rows:
                continue
            group.in_flight = {row.session_id for row in rows}
            try:
                await self._step(rows)
            except Exception as exc:  # a bug of ours: fail this step's sessions, keep going
                log.exception("batched step failed")
                _fail(rows, exc)
            finally:
                group.in_flight = set()
                group.step_done.set()

    async def _step(self, rows: list[_Row]) -> None:
        self.steps += 1
        self.rows += len(rows)
        flat = [token for row in rows for token in row.tokens]
        tokens = torch.tensor([flat], dtype=torch.long, device=self.device)
        hidden = await self.run_local(self.embed, tokens)  # (1, total, C)
        alive = rows
        for stage in self.stages:
            batch = [
                BatchRow(
                    row.session_id,
                    row.start_pos,
                    len(row.tokens),
                    row.stats.stages.setdefault(stage.label, StageTimes()),
                )
                for row in alive
            ]
            try:
                outcome = await stage.forward_batch(batch, hidden)
            except Exception as exc:  # the stage is gone for good: every session fails
                _fail(alive, exc)
                return
            if outcome.failed:
                for index, exc in outcome.failed.items():
                    _fail([alive[index]], exc)
                alive = [row for i, row in enumerate(alive) if i not in outcome.failed]
                if not alive:
                    return
            hidden = outcome.hidden
        ends, offset = [], 0
        for row in alive:
            offset += len(row.tokens)
            ends.append(offset - 1)
        last = hidden[:, ends]  # (1, sessions, C): only each session's last row is sampled
        logits = await self.run_local(self.head, last)  # (1, sessions, vocab)
        for row, row_logits in zip(alive, logits[0], strict=True):
            if not row.future.done():
                row.future.set_result(row_logits)


def _fail(rows: Sequence[_Row], exc: BaseException) -> None:
    for row in rows:
        if not row.future.done():
            row.future.set_exception(exc)
