"""The worker: an asyncio TCP server that holds some blocks and runs them for masters.

Each connection starts with a handshake (`hello` -> `welcome`), then carries `forward` requests
for any number of sessions. A session is one generation of one master: its KV caches live in the
worker's `SessionStore` (cake/engine/sessions.py), keyed by (connection, session id), until the master
closes it, the connection ends, or it is evicted after idling. A session the store cannot serve
(budget, context, session count) gets an error reply; the connection and other sessions go on.

Where tensor work runs (`Worker.run_forward`): a decode step runs inline on the event loop when
nothing else is computing, which saves two thread hand-offs per step (loop -> compute thread ->
loop, each a futex wake); long requests (prefill) and requests that arrive while one computes
run on one compute thread, so a long prefill never stalls pings or other connections. When idle
OpenMP threads spin (cake.threads), every forward runs on the event loop thread, the one that
loaded the weights: each thread that calls torch has its own OpenMP team, and a second team
would spin forever beside the first.

Here: the sessions (checking a request against the store, running it) and serving. What
happens on one connection (admission, limits before and after auth, the request loop, which
errors close it) is cake/wire/worker_connection.py; the handshake itself is cake/wire/handshake.py.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch

from cake.engine.sessions import Session, SessionStore, kv_budget
from cake.errors import CakeError, Code
from cake.host.devices import DTYPE_NAMES
from cake.host.memory import release_free_memory
from cake.host.network import is_loopback
from cake.host.signals import stop_signal
from cake.host.sizes import format_size
from cake.model.config import LlamaConfig, architecture_of
from cake.model.kv_cache import Segment
from cake.model.llama import Llama
from cake.topology import format_blocks
from cake.wire.protocol import (
    Forward,
    ForwardBatch,
    Hello,
    Welcome,
    fingerprint_config,
)
from cake.wire.transport import Link
from cake.wire.worker_connection import serve_connection

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_IDLE_TIMEOUT_S = 600.0
DEFAULT_MAX_SESSIONS = 32
INLINE_MAX_POSITIONS = 16  # longer forwards go to the compute thread (auto dispatch)
COMPUTE_CHOICES = ("auto", "inline", "thread")
LONG_REQUEST = 64  # positions; after a forward this long, freed memory goes back (see devices)


class Worker:
    def __init__(
        self,
        name: str,
        model: Llama,
        max_seq_len: int,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S,
        cluster_key: bytes | None = None,
        tls: ssl.SSLContext | None = None,
        kv_memory: int | None = None,
        compute: str = "auto",
    ) -> None:
        """kv_memory: the KV caches' byte budget (default: a share of free memory, see
        cake.engine.sessions.kv_budget). compute: where forwards run (see run_forward)."""
        if compute not in COMPUTE_CHOICES:
            raise ValueError(f"compute {compute!r}: use {', '.join(COMPUTE_CHOICES)}")
        self.name = name
        self.cluster_key = cluster_key
        self.tls = tls
        self.model = model
        self.config: LlamaConfig = model.config
        self.blocks = model.blocks
        self.served = frozenset(self.blocks)
        self.fingerprint = fingerprint_config(architecture_of(self.config))
        self.device, self.dtype = model.device, model.dtype
        self.max_seq_len = max_seq_len
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        budget = kv_budget(None, self.device) if kv_memory is None else kv_memory
        self.store = SessionStore(
            model,
            self.blocks,
            max_seq_len,
            budget,
            max_sessions=max_sessions,
            idle_timeout_s=idle_timeout,
            owner=f"worker {name}",
        )  # keys: (connection, session id)
        self.store.check_fits_one_session()
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cake-compute")
        if compute == "auto" and os.environ.get("OMP_WAIT_POLICY", "").upper() == "ACTIVE":
            compute = "inline"  # spinning OpenMP threads: one team, on this thread (see above)
        self.compute_mode = compute
        self._offloaded = 0  # forwards queued on or running in the compute thread
        self.connection_ids = itertools.count(1)
        self.links: set[Link] = set()
        self.unauthenticated = 0  # connections still in their handshake

    @property
    def session_count(self) -> int:
        return len(self.store)

    def welcome(self) -> Welcome:
        """The handshake's answer: what this worker is and serves."""
        return Welcome(
            fingerprint=self.fingerprint,
            worker=self.name,
            blocks=tuple(self.blocks),
            device=str(self.device),
            dtype=DTYPE_NAMES[self.dtype],
            max_seq_len=self.max_seq_len,
            kv_memory=self.store.budget_bytes,
        )

    async def handle_connection(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        accepted: tuple[Link, Hello] | None = None,
    ) -> None:
        """Serve one master. `accepted`: a link an empty worker (cake/cluster/empty_worker.py) already
        authenticated, with the Hello it read, handed over once this worker holds its blocks."""
        await serve_connection(self, reader, writer, accepted)

    def close_session(self, conn: int, session_id: str) -> None:
        if self.store.close((conn, session_id)):
            log.info("connection %d: session %s closed", conn, session_id)

    def drop_connection(self, conn: int) -> None:
        """The connection ended: its sessions' caches go with it."""
        dropped = self.store.close_where(lambda key: key[0] == conn)
        if dropped:
            log.info("connection %d: dropped %d session(s)", conn, dropped)

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

    def runs_inline(self, positions: int) -> bool:
        """Whether a forward of `positions` rows computes on the event loop or offloaded."""
        if self.compute_mode != "auto":
            return self.compute_mode == "inline"
        # Nothing offloaded: the compute thread is idle, so running here keeps one computation
        # at a time; a short request blocks the loop for about a decode step only.
        return self._offloaded == 0 and positions <= INLINE_MAX_POSITIONS

    def check_request(self, conn: int, request: Forward) -> Session:
        """The session a forward runs in, or a CakeError to answer it with (on the event loop
        thread)."""
        self.check_blocks_and_width(request.blocks, request.hidden)
        if request.hidden.shape[0] != 1:
            raise CakeError(
                Code.BAD_SHAPE,
                f"hidden states must be (1, T, {self.config.hidden_size}), "
                f"got {list(request.hidden.shape)}",
            )
        return self.check_row(
            conn, request.session, request.start_pos, request.hidden.shape[1], request.blocks
        )

    def check_blocks_and_width(self, blocks: tuple[int, ...], hidden: torch.Tensor) -> None:
        """What every session of a request shares: blocks served here, the model's width."""
        missing = [b for b in blocks if b not in self.served]
        if missing:
            raise CakeError(
                Code.UNKNOWN_BLOCK,
                f"worker {self.name} does not serve block(s) {missing}; it serves {self.blocks}",
            )
        hidden_size = self.config.hidden_size
        if hidden.dim() != 3 or hidden.shape[2] != hidden_size:
            raise CakeError(
                Code.BAD_SHAPE,
                f"hidden states must be (1, T, {hidden_size}), got {list(hidden.shape)}",
            )

    def check_batch(
        self, conn: int, request: ForwardBatch
    ) -> tuple[list[tuple[int, Session]], list[tuple[int, CakeError]]]:
        """Each session of a batched forward on its own: (index, session) to compute, and
        (index, refusal) for the others, which do not stop the rest."""
        self.check_blocks_and_width(request.blocks, request.hidden)
        rows: list[tuple[int, Session]] = []
        refused: list[tuple[int, CakeError]] = []
        for index, (session_id, start_pos, length) in enumerate(
            zip(request.sessions, request.start_positions, request.lengths, strict=True)
        ):
            try:
                session = self.check_row(conn, session_id, start_pos, length, request.blocks)
                rows.append((index, session))
            except CakeError as exc:
                log.warning("request %d, session %s: %s", request.id, session_id[:8], exc)
                refused.append((index, exc))
        return rows, refused

    def check_row(
        self, conn: int, session_id: str, start_pos: int, length: int, blocks: tuple[int, ...]
    ) -> Session:
        """One session's positions start_pos..start_pos+length-1 through `blocks`: its Session
        (claimed, to be released after the compute), or a CakeError to refuse it with."""
        if length == 0:
            raise CakeError(Code.BAD_SHAPE, "hidden states hold no positions (T = 0)")
        key = (conn, session_id)
        session = self.store.get(key)
        if session is None and start_pos > 0:
            raise CakeError(
                Code.UNKNOWN_SESSION,
                f"session {session_id} is unknown to worker {self.name} (a new session "
                "starts at position 0); it was closed, evicted after idling "
                f"{self.store.idle_timeout_s:g}s, or the worker restarted",
            )
        if session is not None:
            behind = [b for b in blocks if session.block_ends.get(b, 0) < start_pos]
            if behind:  # those caches hold nothing at the positions this forward attends to
                raise CakeError(
                    Code.BAD_POSITION,
                    f"start_pos {start_pos} skips positions of session {session_id} in block(s) "
                    f"{behind}: they hold {[session.block_ends.get(b, 0) for b in behind]}",
                )
        opened = session is None
        try:
            if session is None:
                session = self.store.open(key)
            # Reserves the positions now, so the next step's check (which may come before
            # this one's compute ends) sees them; a start before the end rolls back first.
            self.store.claim(session, start_pos, length)
        except CakeError as exc:  # the store's refusal (budget, context, session count)
            if opened and session is not None:
                self.store.close(key)
            raise CakeError(exc.code, f"session {session_id}: {exc}") from None
        for block in blocks:
            session.block_ends[block] = start_pos + length
        if opened:
            log.info("connection %d: session %s opened", conn, session_id)
        return session

    def run_request(self, session: Session, request: Forward) -> tuple[torch.Tensor, int]:
        """Run a checked forward (on the compute thread): hidden states out, microseconds."""
        started = time.perf_counter()
        wire_dtype = request.hidden.dtype
        with torch.inference_mode():
            hidden = request.hidden.to(device=self.device, dtype=self.dtype)
            hidden = self.model.run_blocks(
                hidden, request.start_pos, session.caches, request.blocks
            )
            out = hidden.to(device="cpu", dtype=wire_dtype)
        if request.hidden.shape[1] >= LONG_REQUEST:
            release_free_memory()  # a prefill's large activations: back to the system
        return out, int((time.perf_counter() - started) * 1e6)

    def run_batch(
        self, request: ForwardBatch, rows: list[tuple[int, Session]]
    ) -> tuple[torch.Tensor, int]:
        """Run the checked sessions of a batched forward (on the compute thread): the rows of
        those sessions after the last block, in request order, and microseconds."""
        started = time.perf_counter()
        wire_dtype = request.hidden.dtype
        if not rows:
            return request.hidden[:, :0].clone(), 0
        offsets = [0]
        for length in request.lengths:
            offsets.append(offsets[-1] + length)
        with torch.inference_mode():
            pieces, segments, offset = [], [], 0
            for index, session in rows:
                start, stop = offsets[index], offsets[index + 1]
                pieces.append(request.hidden[:, start:stop])
                segments.append(
                    Segment(session.caches, request.start_positions[index], offset, stop - start)
                )
                offset += stop - start
            hidden = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
            hidden = hidden.to(device=self.device, dtype=self.dtype)
            hidden = self.model.run_segments(hidden, segments, request.blocks)
            out = hidden.to(device="cpu", dtype=wire_dtype)
        if offset >= LONG_REQUEST:
            release_free_memory()
        return out, int((time.perf_counter() - started) * 1e6)

    async def serve(self, host: str, port: int, ready_file: str | None = None) -> asyncio.Server:
        """Listen (port 0: any free port); the 'serving' log line and `ready_file` (JSON: name,
        host, port, pid; written before that line) say which port."""
        server = await asyncio.start_server(self.handle_connection, host, port, ssl=self.tls)
        bound = server.sockets[0].getsockname()
        if ready_file is not None:
            write_ready_file(ready_file, self.name, bound[0], bound[1])
        log.info(
            "worker %s serving blocks %s on %s:%d (%s, %s; context %d, KV memory %s)",
            self.name,
            format_blocks(self.blocks),
            bound[0],
            bound[1],
            self.device,
            DTYPE_NAMES[self.dtype],
            self.max_seq_len,
            format_size(self.store.budget_bytes),
        )
        return server


async def run_worker(worker: Worker, host: str, port: int, ready_file: str | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then close the listener and every connection."""
    stopped = stop_signal()  # before serve() says it serves: a signal right after is orderly
    server = await worker.serve(host, port, ready_file)
    async with server:
        await stopped
        log.info("worker %s shutting down", worker.name)
        server.close()
        for link in list(worker.links):
            link.close()
    worker.compute.shutdown(wait=False, cancel_futures=True)


async def start_worker(
    model: str,
    name: str | None,
    topology: str | None,
    address: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_seq_len: int | None = None,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S,
    cluster_key: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    quantize: str | None = None,
    kv_memory: str | None = None,
    ready_file: str | None = None,
) -> None:
    """`cake-cli --mode worker`: load this node's blocks (nothing else) and serve them."""
    from cake.host.devices import resolve_device
    from cake.host.network import check_can_listen
    from cake.master import DEFAULT_MAX_SEQ_LEN
    from cake.model.gguf import resolve_model_path
    from cake.model.loader import activation_dtype, describe_part, load_llama
    from cake.model.quant import Quantization
    from cake.topology import load_topology, parse_address
    from cake.wire.auth import cluster_key as parse_key
    from cake.wire.auth import server_tls

    if not name or not topology:
        raise ValueError("worker mode needs --name and --topology (which blocks to serve)")
    node = load_topology(topology).node(name)
    host, port = (
        parse_address(address, "--address", any_port=True) if address else (node.host, node.port)
    )
    key, tls = parse_key(cluster_key), server_tls(tls_cert, tls_key)
    if key is None and not is_loopback(host):
        log.warning(
            "worker %s listens on %s without a cluster key: anyone who reaches this port can "
            "use it. Set --cluster-key (or CAKE_CLUSTER_KEY) on workers and master.",
            name,
            host,
        )
    check_can_listen(host, port, "--address" if address else f"worker {name}'s host")
    folder = resolve_model_path(model)
    config = LlamaConfig.from_folder(folder)
    load_topology(topology).check_fits(config.n_layers)
    torch_device = resolve_device(device)
    quantization = Quantization(quantize) if quantize else None
    torch_dtype = activation_dtype(dtype, torch_device, folder, config, quantization)
    seq_len = max_seq_len or min(config.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
    log.info("worker %s: loading blocks %s of %s", name, format_blocks(node.blocks), folder)
    part = load_llama(
        folder,
        node.blocks,
        dtype=torch_dtype,
        device=torch_device,
        max_seq_len=seq_len,
        config=config,
        quantization=quantization,
    )
    log.info("worker %s runs %s", name, describe_part(part))
    worker = Worker(
        name,
        part,
        seq_len,
        kv_memory=kv_budget(kv_memory, torch_device),  # measured after loading the weights
        max_sessions=max_sessions,
        idle_timeout=idle_timeout,
        cluster_key=key,
        tls=tls,
    )
    await run_worker(worker, host, port, ready_file)


def write_ready_file(path: str, name: str, host: str, port: int) -> None:
    """Atomically (write, then rename), so a reader never sees half a file."""
    partial = Path(f"{path}.partial")
    partial.write_text(json.dumps({"name": name, "host": host, "port": port, "pid": os.getpid()}))
    partial.replace(path)
