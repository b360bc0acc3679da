"""The worker: an asyncio TCP server that holds some blocks and runs them for masters.

Each connection starts with a handshake (`hello` -> `welcome`), then carries `forward` requests
for any number of sessions. A session is one generation of one master: its KV caches live in the
worker's `SessionStore` (cake/engine/session_store.py), keyed by (connection, session id), until the
master closes it, the connection ends, or it is evicted after idling. A session the store cannot
serve (budget, context, session count) gets an error reply; the connection and other sessions
go on.

Here: what the worker is (its welcome), its sessions' store, and serving. What happens on one
connection (admission, limits before and after auth, which errors close it) is
cake/wire/worker_connection.py, the handshake cake/wire/handshake.py; a forward request's
checks, compute and reply are cake/engine/worker_requests.py, through the block runner the
master's own stages use too (cake/engine/block_runner.py).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import ssl
from pathlib import Path

from cake.engine.block_runner import BlockRunner
from cake.engine.session_store import SessionStore, kv_budget
from cake.engine.worker_requests import WorkerRequests
from cake.errors import CakeError, Code
from cake.host.devices import DTYPE_NAMES
from cake.host.network import is_loopback, listen_socket
from cake.host.signals import stop_signal
from cake.host.sizes import format_size
from cake.model.config import architecture_of
from cake.model.llama import Llama
from cake.model.loader import describe_kernels, describe_part
from cake.model.opener import open_model
from cake.topology import format_blocks, load_topology, parse_address
from cake.wire.auth import cluster_key as parse_key
from cake.wire.auth import server_tls
from cake.wire.loading import LoadingListener, LoadProgress
from cake.wire.protocol import (
    ErrorMessage,
    ForkSession,
    Hello,
    Message,
    SessionForked,
    Welcome,
    fingerprint_config,
    session_frame_limit,
)
from cake.wire.transport import Link
from cake.wire.worker_connection import serve_connection

log = logging.getLogger(__name__)

DEFAULT_IDLE_TIMEOUT_S = 600.0
DEFAULT_MAX_SESSIONS = 32
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
        cake.engine.session_store.kv_budget). compute: where forwards run (see WorkerRequests)."""
        self.name = name
        self.cluster_key = cluster_key
        self.tls = tls
        self.model = model
        self.config = model.config
        self.blocks = model.blocks
        self.fingerprint = fingerprint_config(architecture_of(self.config))
        self.device, self.dtype = model.device, model.dtype
        self.max_seq_len = max_seq_len
        self.idle_timeout = idle_timeout
        budget = kv_budget(None, self.device) if kv_memory is None else kv_memory
        self.store = SessionStore(  # keys: (connection, session id)
            model,
            self.blocks,
            max_seq_len,
            budget,
            max_sessions=max_sessions,
            idle_timeout_s=idle_timeout,
            owner=f"worker {name}",
        )
        self.store.check_fits_one_session()
        runner = BlockRunner(model, self.store, trim_after=LONG_REQUEST)
        self.requests = WorkerRequests(name, runner, compute)
        self.connection_ids = itertools.count(1)
        self.links: set[Link] = set()
        self.unauthenticated = 0  # connections still in their handshake

    @property
    def session_count(self) -> int:
        """Sessions a master is using now (cached prefixes not counted)."""
        return len(self.store) - self.store.cached_count()

    @property
    def session_frame_bytes(self) -> int:
        return session_frame_limit(self.config.hidden_size, self.max_seq_len)

    @property
    def max_tensor_elements(self) -> int:
        return self.max_seq_len * self.config.hidden_size

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
            kernels=describe_kernels(self.model),
        )

    async def handle_connection(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        accepted: tuple[Link, Hello] | None = None,
    ) -> None:
        """Serve one master. `accepted`: a link an empty worker (cake/cluster/empty_worker.py)
        already authenticated, with the Hello it read, handed over once this worker holds its
        blocks."""
        await serve_connection(self, reader, writer, accepted)

    def close_session(self, conn: int, session_id: str, keep: bool = False) -> None:
        if keep:
            if self.store.retain((conn, session_id)):
                log.info("connection %d: session %s kept as a cached prefix", conn, session_id)
        elif self.store.close((conn, session_id)):
            log.info("connection %d: session %s closed", conn, session_id)

    def fork_session(self, conn: int, request: ForkSession) -> Message:
        """A new session from a cached prefix (SessionStore.fork): its reply, or an error for
        that request alone (the master then computes the prefix again)."""
        try:
            session = self.store.fork(
                (conn, request.parent),
                (conn, request.session),
                request.length,
                request.parent,
                request.move,
            )
        except CakeError as exc:
            log.info("connection %d: fork of %s refused: %s", conn, request.parent, exc)
            return ErrorMessage(message=str(exc), code=exc.code.value, id=request.id)
        except Exception as exc:  # e.g. no memory for the copy: that request only
            log.warning("connection %d: fork of %s failed: %s", conn, request.parent, exc)
            self.store.close((conn, request.session))
            return ErrorMessage(message=str(exc), code=Code.OUT_OF_MEMORY.value, id=request.id)
        log.info(
            "connection %d: session %s opened from %d cached positions of %s (%s)",
            conn,
            request.session,
            session.length,
            request.parent,
            "moved" if request.move else "copied",
        )
        return SessionForked(id=request.id, length=session.length)

    def drop_connection(self, conn: int) -> None:
        """The connection ended: its sessions' caches go with it."""
        dropped = self.store.close_where(lambda key: key[0] == conn)
        if dropped:
            log.info("connection %d: dropped %d session(s)", conn, dropped)

    async def serve(
        self,
        host: str,
        port: int,
        ready_file: str | None = None,
        sock: socket.socket | None = None,
    ) -> asyncio.Server:
        """Listen (port 0: any free port; or on `sock`, bound while the blocks loaded); the
        'serving' log line and `ready_file` (JSON: name, host, port, pid; written before that
        line) say which port."""
        handler = self.handle_connection
        if sock is not None:
            server = await asyncio.start_server(handler, sock=sock, ssl=self.tls)
        else:
            server = await asyncio.start_server(handler, host, port, ssl=self.tls)
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

    def close(self) -> None:
        """Close every connection and stop the compute thread."""
        for link in list(self.links):
            link.close()
        self.requests.shutdown()


async def run_worker(
    worker: Worker,
    host: str,
    port: int,
    ready_file: str | None = None,
    sock: socket.socket | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, then close the listener and every connection."""
    stopped = stop_signal()  # before serve() says it serves: a signal right after is orderly
    server = await worker.serve(host, port, ready_file, sock)
    async with server:
        await stopped
        log.info("worker %s shutting down", worker.name)
        server.close()
        worker.close()


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
    sock = listen_socket(host, port, "--address" if address else f"worker {name}'s host")
    opened = open_model(model)
    load_topology(topology).check_fits(opened.config.n_layers)
    compute = opened.compute(device, dtype, quantize, max_seq_len)
    # Listening while the blocks load: a master that connects now is told how far the load is
    # (cake/wire/loading.py), so it waits instead of failing, and a restarted worker is found.
    what = f"blocks {format_blocks(node.blocks)}"
    progress = LoadProgress(what, len(node.blocks))
    fingerprint = fingerprint_config(architecture_of(opened.config))
    door = LoadingListener(sock, name, fingerprint, lambda: str(progress), key, tls)
    door.start()
    bound = sock.getsockname()
    log.info(
        "worker %s: loading %s of %s (listening on %s:%d meanwhile)",
        name,
        what,
        opened.folder,
        bound[0],
        bound[1],
    )
    try:
        part = opened.load(compute, node.blocks, on_block=progress.advance)
    except BaseException:
        door.stop()
        sock.close()
        raise
    door.stop()
    log.info("worker %s runs %s", name, describe_part(part))
    worker = Worker(
        name,
        part,
        compute.max_seq_len,
        kv_memory=kv_budget(kv_memory, compute.device),  # measured after loading the weights
        max_sessions=max_sessions,
        idle_timeout=idle_timeout,
        cluster_key=key,
        tls=tls,
    )
    await run_worker(worker, host, port, ready_file, sock)


def write_ready_file(path: str, name: str, host: str, port: int) -> None:
    """Atomically (write, then rename), so a reader never sees half a file."""
    partial = Path(f"{path}.partial")
    partial.write_text(json.dumps({"name": name, "host": host, "port": port, "pid": os.getpid()}))
    partial.replace(path)
