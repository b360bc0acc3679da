"""One master's connection to a worker: admission, handshake, frame limits, requests, errors.

What a peer can make the worker hold, and what an error closes:

* **Before the handshake** (the cluster key proved, when one is set, and hello said) a peer is a
  stranger: its frames may be at most HANDSHAKE_MAX_FRAME_BYTES, the whole handshake must finish
  within HANDSHAKE_TIMEOUT_S, and at most MAX_UNAUTHENTICATED such connections exist at once
  (more are refused at once). A stranger can make the worker buffer a few KB, no more.
* **After it**, the frame limit is the session's real maximum: a full context of hidden states
  in f32 (protocol.session_frame_limit), not a fixed 512 MiB.
* **A request's error** (context full, unknown session, bad block, out of memory, any failure
  in its compute) is answered with an error carrying that request's id; the connection, which
  every other session of that master shares, stays open. Only a peer that breaks the protocol
  itself (a malformed frame or message) loses the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import torch

from cake.errors import CakeError, Code
from cake.topology import format_blocks
from cake.wire.handshake import answer_hello, greet_master
from cake.wire.protocol import (
    HANDSHAKE_MAX_FRAME_BYTES,
    BatchResult,
    CloseSession,
    ErrorMessage,
    Forward,
    ForwardBatch,
    Hello,
    Ping,
    Pong,
    ProtocolError,
    Result,
    session_frame_limit,
)
from cake.wire.transport import Link, LinkError

if TYPE_CHECKING:
    from cake.worker import Session, Worker

log = logging.getLogger("cake.worker")

HANDSHAKE_TIMEOUT_S = 10.0
MAX_UNAUTHENTICATED = 16  # connections still in their handshake, at once


async def serve_connection(
    worker: Worker,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    accepted: tuple[Link, Hello] | None = None,
) -> None:
    """Serve one master's connection. `accepted`: a link whose peer already proved the cluster
    key to an empty worker (cake/cluster/empty_worker.py), and the hello it sent; only the hello is
    left to answer."""
    conn = next(worker.connection_ids)
    address = writer.get_extra_info("peername")
    peer = f"{address[0]}:{address[1]}" if address else "peer"
    # A tensor larger than a full context of hidden states is never legitimate.
    max_elements = worker.max_seq_len * worker.config.hidden_size
    if accepted is not None:
        link = accepted[0]
        link.max_tensor_elements = max_elements
    else:
        link = Link(
            reader,
            writer,
            peer,
            max_frame_bytes=HANDSHAKE_MAX_FRAME_BYTES,
            max_tensor_elements=max_elements,
        )
    worker.links.add(link)
    tasks: set[asyncio.Task] = set()
    try:
        if accepted is not None:
            hello = await answer_hello(link, accepted[1], worker.welcome())
            link.set_frame_limit(session_frame_limit(worker.config.hidden_size, worker.max_seq_len))
            log.info("master %r connected from %s (assigned by it)", hello.master, peer)
            await _serve_requests(worker, conn, link, tasks)
            return
        if worker.unauthenticated >= MAX_UNAUTHENTICATED:
            log.warning(
                "connection from %s refused: %d handshakes under way", peer, MAX_UNAUTHENTICATED
            )
            await _try_send(
                link,
                ErrorMessage(
                    message=f"worker {worker.name} has {MAX_UNAUTHENTICATED} connections in "
                    "their handshake already; try again shortly",
                    code=Code.HANDSHAKE_BUSY.value,
                ),
            )
            return
        log.info("connection %d from %s", conn, peer)
        worker.unauthenticated += 1
        try:
            hello = await asyncio.wait_for(
                greet_master(link, worker.welcome(), worker.cluster_key, HANDSHAKE_TIMEOUT_S),
                HANDSHAKE_TIMEOUT_S,
            )
        finally:
            worker.unauthenticated -= 1
        link.set_frame_limit(session_frame_limit(worker.config.hidden_size, worker.max_seq_len))
        log.info("master %r connected from %s", hello.master, peer)
        await _serve_requests(worker, conn, link, tasks)
    except CakeError as exc:  # a refusal in the handshake, or a ProtocolError at any time
        log.warning("connection %d from %s: %s (%s); closing it", conn, peer, exc, exc.code.value)
        await _try_send(link, ErrorMessage(message=str(exc), code=exc.code.value))
    except MemoryError:  # buffering a frame: its framing is lost with it, so the link goes
        log.error("connection %d from %s: out of memory reading a frame; closing it", conn, peer)
        await _try_send(
            link,
            ErrorMessage(
                message=f"worker {worker.name} ran out of memory receiving a frame of up to "
                f"{link.max_frame_bytes} bytes; free memory there or lower --max-seq-len",
                code=Code.OUT_OF_MEMORY.value,
            ),
        )
    except (TimeoutError, asyncio.TimeoutError):
        log.info("connection %d from %s: silent too long, closing it", conn, peer)
    except LinkError as exc:
        log.info("connection %d: %s", conn, exc)
    finally:
        for task in tasks:
            task.cancel()
        worker.drop_connection(conn)
        worker.links.discard(link)
        await link.wait_closed()


async def _serve_requests(worker: Worker, conn: int, link: Link, tasks: set[asyncio.Task]) -> None:
    while True:
        message = await link.recv(timeout=worker.idle_timeout)
        if isinstance(message, Forward):
            # Checked here, in wire order (a close_session right behind a forward must not
            # overtake it); only the tensor work runs as a task.
            try:
                session = worker.check_request(conn, message)
            except CakeError as exc:  # a refusal of this request alone
                log.warning("request %d from %s: %s", message.id, link.peer, exc)
                await link.send(ErrorMessage(message=str(exc), code=exc.code.value, id=message.id))
                continue
            except Exception as exc:  # e.g. no memory for a new session's caches
                await link.send(request_failure(worker, message, exc, "allocating the caches of"))
                continue
            task = asyncio.create_task(_compute(worker, link, session, message))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif isinstance(message, ForwardBatch):
            try:
                rows, refused = worker.check_batch(conn, message)
            except CakeError as exc:  # the blocks or the width: every session alike
                log.warning("request %d from %s: %s", message.id, link.peer, exc)
                await link.send(ErrorMessage(message=str(exc), code=exc.code.value, id=message.id))
                continue
            task = asyncio.create_task(_compute_batch(worker, link, message, rows, refused))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif isinstance(message, CloseSession):
            worker.close_session(conn, message.session)
        elif isinstance(message, Ping):
            await link.send(Pong(id=message.id))
        else:
            raise ProtocolError(f"a master does not send {type(message).__name__!r}")


async def _compute(worker: Worker, link: Link, session: Session, request: Forward) -> None:
    """Run one checked forward on the compute thread and answer it, result or error."""
    try:
        try:
            async with session.lock:
                hidden, compute_us = await worker.run_forward(
                    lambda: worker.run_request(session, request), request.hidden.shape[1]
                )
        finally:
            worker.store.release(session)  # the store may evict or close it again
        reply: Result | ErrorMessage = Result(id=request.id, hidden=hidden, compute_us=compute_us)
    except Exception as exc:  # a failure of ours: say so for this request, keep serving
        reply = request_failure(worker, request, exc, "computing")
    with contextlib.suppress(LinkError):
        await link.send(reply)


async def _compute_batch(
    worker: Worker,
    link: Link,
    request: ForwardBatch,
    rows: list[tuple[int, Session]],
    refused: list[tuple[int, CakeError]],
) -> None:
    """Run the checked sessions of a batched forward as one pass and answer with their rows;
    the refused ones are named in the reply, the others computed."""
    try:
        try:
            async with contextlib.AsyncExitStack() as locks:
                for _, session in rows:  # distinct sessions: ForwardBatch checks it
                    await locks.enter_async_context(session.lock)
                hidden, compute_us = await worker.run_forward(
                    lambda: worker.run_batch(request, rows), request.hidden.shape[1]
                )
        finally:
            for _, session in rows:
                worker.store.release(session)
        reply: BatchResult | ErrorMessage = BatchResult(
            id=request.id,
            hidden=hidden,
            failed=tuple(index for index, _ in refused),
            codes=tuple(exc.code.value for _, exc in refused),
            errors=tuple(str(exc) for _, exc in refused),
            compute_us=compute_us,
        )
    except Exception as exc:  # a failure of ours: say so for this request, keep serving
        reply = request_failure(worker, request, exc, "computing")
    with contextlib.suppress(LinkError):
        await link.send(reply)


def request_failure(
    worker: Worker, request: Forward | ForwardBatch, exc: BaseException, doing: str
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
            message=f"worker {worker.name} ran out of memory on {worker.device} {doing} "
            f"{what}: {_first_line(exc)}; free memory there, lower --max-sessions or "
            "--max-seq-len, or move blocks to another worker",
            code=Code.OUT_OF_MEMORY.value,
            id=request.id,
        )
    log.error("request %d failed %s (%s)", request.id, doing, what, exc_info=exc)
    return ErrorMessage(
        message=f"worker {worker.name} failed {doing} {what}: {_first_line(exc)}",
        code=Code.INTERNAL.value,
        id=request.id,
    )


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


async def _try_send(link: Link, message: ErrorMessage) -> None:
    with contextlib.suppress(LinkError):
        await link.send(message)
