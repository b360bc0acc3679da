"""A worker's forward requests: checked in wire order, computed inline or on the compute thread,
answered with the result or with an error for that request alone.

Where tensor work runs (`run_forward`): a decode step runs inline on the event loop when nothing
else is computing, which saves two thread hand-offs per step (loop -> compute thread -> loop,
each a futex wake); long requests (prefill) and requests that arrive while one computes run on
one compute thread, so a long prefill never stalls pings or other connections. When idle OpenMP
threads spin (cake/host/threads.py), every forward runs on the event loop thread, the one that
loaded the weights: each thread that calls torch has its own OpenMP team, and a second team
would spin forever beside the first.

A request's error (context full, unknown session, bad block, out of memory, any failure in its
compute) is answered with an error carrying that request's id; the connection, which every
other session of that master shares, stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from cake.engine.block_runner import BlockRunner, Claim
from cake.errors import CakeError, Code
from cake.topology import format_blocks
from cake.wire.protocol import BatchResult, ErrorMessage, Forward, ForwardBatch, Result
from cake.wire.transport import Link, LinkError

log = logging.getLogger("cake.worker")
T = TypeVar("T")

INLINE_MAX_POSITIONS = 16  # longer forwards go to the compute thread (auto dispatch)
COMPUTE_CHOICES = ("auto", "inline", "thread")


class WorkerRequests:
    def __init__(self, name: str, runner: BlockRunner, compute: str = "auto") -> None:
        """compute: where forwards run, auto|inline|thread (see the module docstring)."""
        if compute not in COMPUTE_CHOICES:
            raise ValueError(f"compute {compute!r}: use {', '.join(COMPUTE_CHOICES)}")
        if compute == "auto" and os.environ.get("OMP_WAIT_POLICY", "").upper() == "ACTIVE":
            compute = "inline"  # spinning OpenMP threads: one team, on this thread
        self.name = name
        self.runner = runner
        self.hidden_size = runner.model.config.hidden_size
        self.compute_mode = compute
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cake-compute")
        self._offloaded = 0  # forwards queued on or running in the compute thread

    async def accept(
        self, conn: int, link: Link, request: Forward | ForwardBatch, tasks: set[asyncio.Task]
    ) -> None:
        """Check a request here, in wire order (a close_session right behind a forward must not
        overtake it); only its tensor work runs as a task (added to `tasks`)."""
        try:
            if isinstance(request, Forward):
                claim = self.check_request(conn, request)
                work = self._compute(link, claim, request)
            else:
                claims, refused = self.check_batch(conn, request)
                work = self._compute_batch(link, request, claims, refused)
        except CakeError as exc:  # a refusal of this request alone
            log.warning("request %d from %s: %s", request.id, link.peer, exc)
            await link.send(ErrorMessage(message=str(exc), code=exc.code.value, id=request.id))
            return
        except Exception as exc:  # e.g. no memory for a new session's caches
            await link.send(self.failure(request, exc, "allocating the caches of"))
            return
        task = asyncio.create_task(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    # ---------------------------------------------------------------- checks (event loop)

    def check_request(self, conn: int, request: Forward) -> Claim:
        """The claim a forward runs under, or a CakeError to answer it with."""
        self._check_shape(request.blocks, request.hidden)
        if request.hidden.shape[0] != 1:
            raise CakeError(
                Code.BAD_SHAPE,
                f"hidden states must be (1, T, {self.hidden_size}), "
                f"got {list(request.hidden.shape)}",
            )
        return self._admit(
            conn, request.session, request.start_pos, request.hidden.shape[1], request.blocks
        )

    def check_batch(
        self, conn: int, request: ForwardBatch
    ) -> tuple[list[tuple[int, Claim]], list[tuple[int, CakeError]]]:
        """Each session of a batched forward on its own: (index, claim) to compute, and
        (index, refusal) for the others, which do not stop the rest."""
        self._check_shape(request.blocks, request.hidden)
        claims: list[tuple[int, Claim]] = []
        refused: list[tuple[int, CakeError]] = []
        for index, (session_id, start_pos, length) in enumerate(
            zip(request.sessions, request.start_positions, request.lengths, strict=True)
        ):
            try:
                claims.append(
                    (index, self._admit(conn, session_id, start_pos, length, request.blocks))
                )
            except CakeError as exc:
                log.warning("request %d, session %s: %s", request.id, session_id[:8], exc)
                refused.append((index, exc))
        return claims, refused

    def _check_shape(self, blocks: tuple[int, ...], hidden: torch.Tensor) -> None:
        """What every session of a request shares: blocks served here, the model's width."""
        self.runner.check_blocks(blocks, f"worker {self.name}")
        if hidden.dim() != 3 or hidden.shape[2] != self.hidden_size:
            raise CakeError(
                Code.BAD_SHAPE,
                f"hidden states must be (1, T, {self.hidden_size}), got {list(hidden.shape)}",
            )

    def _admit(
        self, conn: int, session_id: str, start_pos: int, length: int, blocks: tuple[int, ...]
    ) -> Claim:
        key = (conn, session_id)
        new = self.runner.store.get(key) is None
        claim = self.runner.admit(key, start_pos, length, blocks, session_id)
        if new:
            log.info("connection %d: session %s opened", conn, session_id)
        return claim

    # ---------------------------------------------------------------- compute

    def run_request(self, claim: Claim, request: Forward) -> tuple[torch.Tensor, int]:
        """A checked forward's tensor work: hidden states out (on the CPU, in the request's
        dtype), and microseconds."""
        started = time.perf_counter()
        out = self.runner.run(request.hidden, [claim], request.blocks)
        out = out.to(device="cpu", dtype=request.hidden.dtype)
        return out, int((time.perf_counter() - started) * 1e6)

    def run_batch(
        self, request: ForwardBatch, claims: list[tuple[int, Claim]]
    ) -> tuple[torch.Tensor, int]:
        """The checked sessions of a batched forward in one pass: their rows after the last
        block, in request order, and microseconds."""
        started = time.perf_counter()
        if not claims:
            return request.hidden[:, :0].clone(), 0
        offsets = [0]
        for length in request.lengths:
            offsets.append(offsets[-1] + length)
        pieces = [request.hidden[:, offsets[i] : offsets[i + 1]] for i, _ in claims]
        hidden = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        out = self.runner.run(hidden, [claim for _, claim in claims], request.blocks)
        out = out.to(device="cpu", dtype=request.hidden.dtype)
        return out, int((time.perf_counter() - started) * 1e6)

    async def run_forward(self, run: Callable[[], T], positions: int) -> T:
        """Run one checked forward's tensor work: inline on the event loop, or on the compute
        thread (see the module's docstring)."""
        if self.runs_inline(positions):
            return run()
        self._offloaded += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.compute, run)
        finally:
            self._offloaded -= 1

    def counting_experts(self, run: Callable[[], T]) -> tuple[T, tuple[int, ...]]:
        """`run`'s result and the rows each expert of this worker's mixture-of-experts blocks
        took in it (empty for a dense model). Measured around the run itself, on the thread
        that computes: forwards compute one at a time (runs_inline), so no other counts mix in.
        """
        before = self.runner.model.expert_load()
        result = run()
        if before is None:
            return result, ()
        after = self.runner.model.expert_load()
        assert after is not None
        return result, tuple((after - before).tolist())

    def runs_inline(self, positions: int) -> bool:
        """Whether a forward of `positions` rows computes on the event loop or offloaded."""
        if self.compute_mode != "auto":
            return self.compute_mode == "inline"
        # Nothing offloaded: the compute thread is idle, so running here keeps one computation
        # at a time; a short request blocks the loop for about a decode step only.
        return self._offloaded == 0 and positions <= INLINE_MAX_POSITIONS

    async def _compute(self, link: Link, claim: Claim, request: Forward) -> None:
        """Run one checked forward and answer it, result or error."""
        try:
            try:
                async with claim.session.lock:
                    (hidden, compute_us), experts = await self.run_forward(
                        lambda: self.counting_experts(lambda: self.run_request(claim, request)),
                        request.hidden.shape[1],
                    )
            finally:
                self.runner.release([claim])  # the store may evict or close it again
            reply: Result | ErrorMessage = Result(
                id=request.id, hidden=hidden, compute_us=compute_us, experts=experts
            )
        except Exception as exc:  # a failure of ours: say so for this request, keep serving
            reply = self.failure(request, exc, "computing")
        with contextlib.suppress(LinkError):
            await link.send(reply)

    async def _compute_batch(
        self,
        link: Link,
        request: ForwardBatch,
        claims: list[tuple[int, Claim]],
        refused: list[tuple[int, CakeError]],
    ) -> None:
        """Run the checked sessions of a batched forward as one pass and answer with their
        rows; the refused ones are named in the reply, the others computed."""
        try:
            try:
                async with contextlib.AsyncExitStack() as locks:
                    for _, claim in claims:  # distinct sessions: ForwardBatch checks it
                        await locks.enter_async_context(claim.session.lock)
                    (hidden, compute_us), experts = await self.run_forward(
                        lambda: self.counting_experts(lambda: self.run_batch(request, claims)),
                        request.hidden.shape[1],
                    )
            finally:
                self.runner.release([claim for _, claim in claims])
            reply: BatchResult | ErrorMessage = BatchResult(
                id=request.id,
                hidden=hidden,
                failed=tuple(index for index, _ in refused),
                codes=tuple(exc.code.value for _, exc in refused),
                errors=tuple(str(exc) for _, exc in refused),
                compute_us=compute_us,
                experts=experts,
            )
        except Exception as exc:  # a failure of ours: say so for this request, keep serving
            reply = self.failure(request, exc, "computing")
        with contextlib.suppress(LinkError):
            await link.send(reply)

    def failure(
        self, request: Forward | ForwardBatch, exc: BaseException, doing: str
    ) -> ErrorMessage:
        """The error reply for a request whose handling failed here: for that request only.

        Out of memory names the worker and what did not fit; anything else is logged with its
        traceback (it is a bug or a broken device) and reported by its message.
        """
        positions = request.hidden.shape[1]
        if isinstance(request, ForwardBatch):
            whose = f"{len(request.sessions)} sessions"
        else:
            whose = f"session {request.session[:8]} at {request.start_pos}.."
        what = f"{positions} position(s) of {whose} through blocks {format_blocks(request.blocks)}"
        if is_out_of_memory(exc):
            log.error("request %d: out of memory %s %s: %s", request.id, doing, what, exc)
            return ErrorMessage(
                message=f"worker {self.name} ran out of memory on {self.runner.model.device} "
                f"{doing} {what}: {_first_line(exc)}; free memory there, lower --max-sessions "
                "or --max-seq-len, or move blocks to another worker",
                code=Code.OUT_OF_MEMORY.value,
                id=request.id,
            )
        log.error("request %d failed %s (%s)", request.id, doing, what, exc_info=exc)
        return ErrorMessage(
            message=f"worker {self.name} failed {doing} {what}: {_first_line(exc)}",
            code=Code.INTERNAL.value,
            id=request.id,
        )

    def shutdown(self) -> None:
        self.compute.shutdown(wait=False, cancel_futures=True)


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    if isinstance(exc, oom_type):
        return True
    text = str(exc)  # CPU and MPS allocators raise RuntimeError with these words
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
