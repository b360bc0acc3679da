"""The master's stages in block order: one step through all of them, and new stages when a
worker is lost for good.

A step carries rows of several sessions (one row per session: its next positions). It enters
the first stage as one pass, and each stage hands its output to the next. A step longer than
`micro_batch` positions (a long prompt) is cut into micro-batches of that many positions, which
flow through the stages as a pipeline: micro-batch k+1 enters stage i as soon as micro-batch k
has left it (a stage must see a session's positions in order), so with several stages the
first computes the next piece of a prompt while the second computes this one.

Re-planning (a cluster the master planned itself, --workers or --discover): a worker that does
not come back within --retry-timeout fails the rows that need it with `WorkerGone`. The session
that sees it calls `recover`: every stage is retired (what is in flight ends with
`StagesReplaced`, worker connections close so the survivors can take a new assignment), the
blocks are placed again over the workers that still answer (`Replanning.plan`, from
cake/cluster/setup.py), the new stages are built, and the epoch moves on. Each session notices
the new epoch before its next step and runs its steps again there (cake/engine/session.py).
One re-plan serves every session that failed with the same loss (a lock and the epoch). With a
hand-written topology there is no plan to redo: the loss ends those sessions, with its reason.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import torch

from cake.engine.stage_builder import StageBuilder
from cake.engine.stages import Stage, StageHealth, StageRow, StageTimes
from cake.errors import CakeError, WorkerError
from cake.topology import Topology, format_blocks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepRow:
    """One session's next positions in a step: rows start_pos..start_pos+length-1."""

    session_id: str
    start_pos: int
    length: int
    stage_times: dict[str, StageTimes]  # the session's account of each stage's time


@dataclass
class StepOutcome:
    """Hidden states after the last stage, (1, length, C) per row that went through, and the
    rows (by index) that failed, with why."""

    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    failed: dict[int, Exception] = field(default_factory=dict)


@dataclass(frozen=True)
class _Piece:
    """Positions offset..offset+length-1 of row `row`, in one micro-batch."""

    row: int
    offset: int
    length: int


@dataclass
class Replanning:
    """What a master that planned its cluster itself does when a worker is lost for good:
    `plan()` measures the workers that still answer, places the blocks, pushes what they lack
    and assigns them, and returns the new topology."""

    plan: Callable[[], Awaitable[Topology]]


class Pipeline:
    """The stages of one master, the step through them, and their replacement."""

    def __init__(
        self,
        stages: Sequence[Stage],
        builder: StageBuilder | None = None,
        replanning: Replanning | None = None,
        micro_batch: int = 512,
    ) -> None:
        if micro_batch < 1:
            raise ValueError(f"--prefill-chunk must be at least 1, got {micro_batch}")
        self.stages = list(stages)
        self.builder = builder  # to build stages again after a re-plan
        self.replanning = replanning
        self.micro_batch = micro_batch
        self.overlap = True  # micro-batches overlap across stages (off: one at a time)
        self.epoch = 0  # re-plans so far: a session on older stages runs its steps again
        self._replanning_lock = asyncio.Lock()

    @property
    def remote_stages(self) -> int:
        return sum(stage.remote for stage in self.stages)

    # ------------------------------------------------------------------ one step

    async def run(self, rows: Sequence[StepRow], hidden: torch.Tensor) -> StepOutcome:
        """hidden (1, sum of the rows' lengths, C), the rows one after the other, through every
        stage; a row a stage refuses fails alone, a stage that fails for good fails every row
        it had."""
        # The stages as the step starts: a re-plan meanwhile fails its rows (StagesReplaced),
        # it does not change the stages the step's micro-batches are ordered on.
        step = _Step(rows, list(self.stages))
        batches = _micro_batches(rows, self.micro_batch)
        starts = [0]
        for pieces in batches:
            starts.append(starts[-1] + sum(piece.length for piece in pieces))
        slices = [hidden[:, start:stop] for start, stop in itertools.pairwise(starts)]
        if len(batches) == 1 or not self.overlap:
            results = [
                await step.through_stages(pieces, part)
                for pieces, part in zip(batches, slices, strict=True)
            ]
        else:
            results = await step.overlapped(batches, slices)
        by_row: dict[int, list[torch.Tensor]] = {}
        for pieces, out in results:
            offset = 0
            for piece in pieces:
                by_row.setdefault(piece.row, []).append(out[:, offset : offset + piece.length])
                offset += piece.length
        outcome = StepOutcome(failed=step.failed)
        for row, parts in by_row.items():
            if row not in step.failed:
                outcome.hidden[row] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return outcome

    # ------------------------------------------------------------------ sessions

    async def rollback(self, session_id: str, length: int) -> None:
        for stage in self.stages:
            await stage.rollback(session_id, length)

    async def fork_session(
        self, session_id: str, parent_id: str, length: int, move: bool = False
    ) -> bool:
        """Open the session on every stage from the cached `parent_id`'s first `length`
        positions (`move`: taking the parent's caches), all stages at once; False (and the
        session closed again wherever it was opened) if any stage no longer holds that prefix
        or cannot serve now: the caller then computes the prefix as for a new session."""
        stages = list(self.stages)
        outcomes = await asyncio.gather(
            *(stage.fork_session(session_id, parent_id, length, move) for stage in stages),
            return_exceptions=True,
        )
        refusals = [o for o in outcomes if isinstance(o, BaseException)]
        if not refusals:
            return True
        for refusal in refusals:
            if not isinstance(refusal, CakeError):
                raise refusal  # a bug of ours, not a refusal
        log.info("cached prefix %s not used: %s", parent_id[:8], refusals[0])
        for stage in stages:
            await stage.close_session(session_id)
        return False

    async def close_session(self, session_id: str, keep: bool = False) -> None:
        for stage in self.stages:
            await stage.close_session(session_id, keep)

    async def health(self) -> list[StageHealth]:
        return [await stage.health() for stage in self.stages]

    # ------------------------------------------------------------------ re-planning

    async def recover(self, cause: WorkerError, epoch: int) -> None:
        """A step on the stages of `epoch` failed for good: re-plan (unless another session did
        since), or re-raise `cause` when this master has no plan of its own."""
        if self.replanning is None or self.builder is None:
            raise cause
        async with self._replanning_lock:
            if self.epoch != epoch:
                return
            log.warning("%s; planning again over the workers that still answer", cause)
            for stage in self.stages:
                await stage.retire()
            topology = await self.replanning.plan()
            self.stages = await self.builder.rebuild(topology)
            self.epoch += 1
            placed = "; ".join(
                f"{node.name}: blocks {format_blocks(node.blocks)}" for node in topology.nodes
            )
            log.warning(
                "re-planned: %s; sessions in progress run their steps again on the new stages",
                placed or "every block on the master",
            )

    async def close(self) -> None:
        for stage in self.stages:
            await stage.close()


@dataclass
class _Step:
    """One step in flight: its rows, the stages it runs on, the rows that failed so far."""

    rows: Sequence[StepRow]
    stages: list[Stage]
    failed: dict[int, Exception] = field(default_factory=dict)

    async def overlapped(
        self, batches: list[list[_Piece]], slices: list[torch.Tensor]
    ) -> list[tuple[list[_Piece], torch.Tensor]]:
        """Micro-batches as tasks: k enters stage i once k - 1 has left it (left[i][k - 1])."""
        left = [[asyncio.Event() for _ in batches] for _ in self.stages]
        tasks = [
            asyncio.create_task(self.through_stages(pieces, part, (left, k)))
            for k, (pieces, part) in enumerate(zip(batches, slices, strict=True))
        ]
        try:
            return [await task for task in tasks]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def through_stages(
        self,
        pieces: list[_Piece],
        hidden: torch.Tensor,
        order: tuple[list[list[asyncio.Event]], int] | None = None,
    ) -> tuple[list[_Piece], torch.Tensor]:
        """One micro-batch through every stage: the pieces still alive and their hidden states.
        order = (left, k): left[i][k] is set when micro-batch k leaves stage i."""
        for i, stage in enumerate(self.stages):
            if order is not None and order[1]:
                await order[0][i][order[1] - 1].wait()
            try:
                pieces, hidden = await self.through_stage(stage, pieces, hidden)
            finally:
                if order is not None:
                    order[0][i][order[1]].set()
        return pieces, hidden

    async def through_stage(
        self, stage: Stage, pieces: list[_Piece], hidden: torch.Tensor
    ) -> tuple[list[_Piece], torch.Tensor]:
        alive = [piece for piece in pieces if piece.row not in self.failed]
        if len(alive) < len(pieces):  # an earlier micro-batch failed some rows
            hidden = _keep(hidden, pieces, alive)
        if not alive:
            return alive, hidden
        rows = self.rows
        stage_rows = [
            StageRow(
                rows[piece.row].session_id,
                rows[piece.row].start_pos + piece.offset,
                piece.length,
                rows[piece.row].stage_times.setdefault(stage.label, StageTimes()),
            )
            for piece in alive
        ]
        try:
            outcome = await stage.forward(stage_rows, hidden)
        except Exception as exc:  # the stage is gone for good: every row it had fails
            for piece in alive:
                self.failed.setdefault(piece.row, exc)
            return [], hidden[:, :0]
        for index, exc in outcome.failed.items():
            self.failed.setdefault(alive[index].row, exc)
        kept = [piece for index, piece in enumerate(alive) if index not in outcome.failed]
        return kept, outcome.hidden


def _micro_batches(rows: Sequence[StepRow], limit: int) -> list[list[_Piece]]:
    """The step's positions, in order, cut into runs of at most `limit` positions."""
    batches: list[list[_Piece]] = [[]]
    room = limit
    for index, row in enumerate(rows):
        offset = 0
        while offset < row.length:
            if room == 0:
                batches.append([])
                room = limit
            length = min(room, row.length - offset)
            batches[-1].append(_Piece(index, offset, length))
            offset += length
            room -= length
    return batches


def _keep(hidden: torch.Tensor, pieces: list[_Piece], kept: list[_Piece]) -> torch.Tensor:
    """The rows of `hidden` (laid out as `pieces`) that belong to `kept`."""
    parts, offset = [], 0
    for piece in pieces:
        if piece in kept:
            parts.append(hidden[:, offset : offset + piece.length])
        offset += piece.length
    return torch.cat(parts, dim=1) if parts else hidden[:, :0]
