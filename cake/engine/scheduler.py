"""The step scheduler: the one path by which positions reach the model, for every caller.

A generation (the CLI's, the API's, the terminal chat's), a perplexity window and a drafted
verification all read as one session's loop: each asks for its next positions and awaits them
(`Session.forward`). The scheduler gathers what the sessions of a *group* ask for into one step:
one embedding, one pass per stage (a single frame per worker, whatever the number of
sessions), one head for the rows that want logits. Decode is memory-bound, so a step for eight
sessions reads each weight once and costs little more than a step for one. A verification row
carries a session's drafted positions and asks for the logits of each; it rides in the same
step as the others' single positions.

Sessions join and leave between steps. With `step_positions` set (the HTTP API), a long prompt
goes in chunks of that many positions, one per step, so a new request's prefill never stalls
the others' decode for long; without it (a single CLI generation) a prompt is one step, which
the pipeline cuts into micro-batches that overlap across stages (cake/engine/pipeline.py).

With several stages, sessions are spread over `groups` disjoint groups that step on their own:
while one group is on the second worker, the next can be on the first (vLLM's pipelining).
Without batching, every session is a group of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import torch

from cake.engine.pipeline import Pipeline, StepRow
from cake.engine.session import Output, Session

log = logging.getLogger(__name__)

DEFAULT_STEP_POSITIONS = 128  # positions of one prompt per step, when sessions share steps
DEFAULT_GATHER_S = 0.003  # how long a step waits for members that have not asked yet

RunLocal = Callable[..., Awaitable[torch.Tensor]]


@dataclass
class _Request:
    session: Session
    tokens: list[int]
    start_pos: int
    output: Output
    future: asyncio.Future[torch.Tensor | None]


@dataclass
class _Group:
    members: set[str] = field(default_factory=set)
    queue: dict[str, _Request] = field(default_factory=dict)  # session -> what it waits on
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: set[str] = field(default_factory=set)
    step_done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None


class StepScheduler:
    def __init__(
        self,
        embed: Callable[[torch.Tensor], torch.Tensor],
        head: Callable[[torch.Tensor], torch.Tensor],
        pipeline: Pipeline,
        run_local: RunLocal,
        device: torch.device,
        *,
        groups: int = 1,
        batching: bool = True,
        step_positions: int | None = None,
        gather_s: float = DEFAULT_GATHER_S,
    ) -> None:
        """`run_local(fn, *args)` awaits the master's own tensor work (inline or on a thread);
        `step_positions`: most positions of one session per step (None: a prompt in one)."""
        if groups < 1 or (step_positions is not None and step_positions < 1):
            raise ValueError("groups and step_positions must be at least 1")
        self.embed, self.head = embed, head
        self.pipeline = pipeline
        self.run_local = run_local
        self.device = device
        self.batching = batching
        self.step_positions = step_positions
        self.gather_s = gather_s
        self.groups = [_Group() for _ in range(groups)]
        self._group_of: dict[str, _Group] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        self.steps = 0  # steps run, for stats and tests
        self.rows = 0  # session rows carried by those steps

    # ---------------------------------------------------------------- membership

    def open_session(self) -> Session:
        """A new session, in the group with the fewest members."""
        if self.closed:
            raise RuntimeError("the master is closed")
        self._bind_to_running_loop()
        session = Session(self, self.pipeline)
        # Without batching every session steps alone, in a group of its own.
        group = min(self.groups, key=lambda g: len(g.members)) if self.batching else _Group()
        group.members.add(session.id)
        self._group_of[session.id] = group
        if group.task is None or group.task.done():
            group.task = asyncio.create_task(self._step_loop(group))
        return session

    def _bind_to_running_loop(self) -> None:
        """A master used from one event loop after another (each `asyncio.run` of a script or
        a test): groups whose loop has ended start afresh on this one."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._group_of:
            raise RuntimeError("sessions of another event loop are still open on this master")
        self._loop = loop
        self.groups = [_Group() for _ in self.groups]

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
        """Stop stepping; sessions still waiting on a step see it cancelled."""
        self.closed = True
        groups = {id(group): group for group in [*self.groups, *self._group_of.values()]}
        for group in groups.values():
            if group.task is not None:
                group.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await group.task
            for request in group.queue.values():
                request.future.cancel()
            group.queue.clear()

    # ---------------------------------------------------------------- asking for a step

    async def run(
        self, session: Session, tokens: Sequence[int], start_pos: int, output: Output
    ) -> torch.Tensor | None:
        """`output` for `tokens` placed at start_pos onwards (see Output); a prompt longer than
        `step_positions` goes through in chunks, one step each."""
        if self.closed:
            raise RuntimeError("the master is closed")
        group = self._group_of[session.id]
        tokens = list(tokens)
        # A session alone in its group (no batching) has no one to stall: one step.
        size = (self.step_positions if self.batching else None) or max(len(tokens), 1)
        results: list[torch.Tensor] = []
        for offset in range(0, len(tokens), size):
            last = offset + size >= len(tokens)
            keeps_all = output in (Output.ALL_LOGITS, Output.HIDDEN)
            wanted = output if last or keeps_all else Output.NOTHING
            future: asyncio.Future[torch.Tensor | None] = asyncio.get_running_loop().create_future()
            group.queue[session.id] = _Request(
                session, tokens[offset : offset + size], start_pos + offset, wanted, future
            )
            group.wake.set()
            try:
                result = await future
            except asyncio.CancelledError:
                group.queue.pop(session.id, None)
                raise
            if result is not None:
                results.append(result)
        if output is Output.NOTHING or not results:
            return None
        if len(results) == 1 or output is Output.LAST_LOGITS:
            return results[-1]
        return torch.cat(results, dim=0 if output is Output.ALL_LOGITS else 1)

    # ---------------------------------------------------------------- the step loop

    async def _step_loop(self, group: _Group) -> None:
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
            requests = list(group.queue.values())
            group.queue.clear()
            if not requests:
                continue
            group.in_flight = {request.session.id for request in requests}
            try:
                await self._step(requests)
            except asyncio.CancelledError:
                for request in requests:
                    request.future.cancel()
                raise
            except Exception as exc:  # a bug of ours: fail this step's sessions, keep going
                log.exception("step failed")
                _fail(requests, exc)
            finally:
                group.in_flight = set()
                group.step_done.set()

    async def _step(self, requests: list[_Request]) -> None:
        self.steps += 1
        self.rows += len(requests)
        flat = [token for request in requests for token in request.tokens]
        tokens = torch.tensor([flat], dtype=torch.long, device=self.device)
        hidden = await self.run_local(self.embed, tokens)  # (1, total, C)
        rows = [
            StepRow(r.session.id, r.start_pos, len(r.tokens), r.session.stage_times)
            for r in requests
        ]
        outcome = await self.pipeline.run(rows, hidden)
        for index, exc in outcome.failed.items():
            _fail([requests[index]], exc)
        logits = await self._head(requests, outcome.hidden)
        for index, request in enumerate(requests):
            if request.future.done() or index in outcome.failed:
                continue
            if request.output is Output.HIDDEN:
                request.future.set_result(outcome.hidden[index])
            else:
                request.future.set_result(logits.get(index))

    async def _head(
        self, requests: list[_Request], hidden: dict[int, torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        """One head call for every row that wants logits: row index -> (vocab,) for the last
        position, or (T, vocab) for every position."""
        wanted = [
            index
            for index, request in enumerate(requests)
            if index in hidden and request.output in (Output.LAST_LOGITS, Output.ALL_LOGITS)
        ]
        if not wanted:
            return {}
        parts = [
            hidden[i][:, -1:] if requests[i].output is Output.LAST_LOGITS else hidden[i]
            for i in wanted
        ]
        joined = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        logits = (await self.run_local(self.head, joined))[0]  # (rows wanted, vocab)
        out, offset = {}, 0
        for index, part in zip(wanted, parts, strict=True):
            length = part.shape[1]
            rows = logits[offset : offset + length]
            out[index] = rows[-1] if requests[index].output is Output.LAST_LOGITS else rows
            offset += length
        return out


def _fail(requests: Sequence[_Request], exc: BaseException) -> None:
    for request in requests:
        if not request.future.done():
            request.future.set_exception(exc)
