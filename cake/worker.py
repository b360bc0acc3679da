"""The worker: an asyncio TCP server that holds some blocks and runs them for masters.

Each connection starts with a handshake (`hello` -> `welcome`), then carries `forward` requests
for any number of sessions. A session is one generation of one master: it has its own KV caches
here, and lives until the master closes it or the connection ends. Tensor work runs on one
compute thread, off the event loop, so a long prefill never stalls pings or other connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import signal
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from cake.auth import check_proof, new_nonce, proof
from cake.config import LlamaConfig, architecture_of
from cake.devices import DTYPE_NAMES, release_free_memory
from cake.model import Llama, SessionCache
from cake.protocol import (
    PROTOCOL_VERSION,
    AuthChallenge,
    AuthProof,
    AuthResponse,
    CloseSession,
    ErrorMessage,
    Forward,
    Hello,
    Ping,
    Pong,
    ProtocolError,
    Result,
    Welcome,
    fingerprint_config,
)
from cake.topology import format_blocks
from cake.transport import Link, LinkError

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
DEFAULT_IDLE_TIMEOUT_S = 600.0
DEFAULT_MAX_SESSIONS = 32
LONG_REQUEST = 64  # positions; after a forward this long, freed memory goes back (see devices)


class RequestError(ProtocolError):
    """A well-formed request this worker cannot serve; answered with an error of this code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Session:
    cache: SessionCache
    length: int = 0  # positions 0..length-1 hold keys/values
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


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
    ) -> None:
        self.name = name
        self.cluster_key = cluster_key
        self.tls = tls
        self.model = model
        self.config: LlamaConfig = model.config
        self.blocks = model.blocks
        self.served = frozenset(self.blocks)
        self.fingerprint = fingerprint_config(architecture_of(self.config))
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_seq_len = max_seq_len
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.sessions: dict[tuple[int, str], Session] = {}  # (connection, session id)
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cake-compute")
        self._connection_ids = itertools.count(1)
        self.links: set[Link] = set()

    @property
    def session_count(self) -> int:
        return len(self.sessions)

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn = next(self._connection_ids)
        address = writer.get_extra_info("peername")
        peer = f"{address[0]}:{address[1]}" if address else "peer"
        # A tensor larger than a full context of hidden states is never legitimate.
        link = Link(
            reader, writer, peer, max_tensor_elements=self.max_seq_len * self.config.hidden_size
        )
        log.info("connection %d from %s", conn, peer)
        self.links.add(link)
        tasks: set[asyncio.Task] = set()
        try:
            await self._handshake(link)
            while True:
                message = await link.recv(timeout=self.idle_timeout)
                if isinstance(message, Forward):
                    # Checked here, in wire order (a close_session right behind a forward
                    # must not overtake it); only the tensor work runs as a task.
                    try:
                        session = self.check_request(conn, message)
                    except RequestError as exc:
                        log.warning("request %d from %s: %s", message.id, peer, exc)
                        reply = ErrorMessage(message=str(exc), code=exc.code, id=message.id)
                        await link.send(reply)
                        if exc.code == "too_many_sessions":
                            continue
                        break  # the master's view of this worker is wrong: close
                    task = asyncio.create_task(self._forward(link, session, message))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                elif isinstance(message, CloseSession):
                    if self.sessions.pop((conn, message.session), None) is not None:
                        log.info("connection %d: session %s closed", conn, message.session)
                elif isinstance(message, Ping):
                    await link.send(Pong(id=message.id))
                else:
                    raise ProtocolError(f"a master does not send {type(message).__name__!r}")
        except ProtocolError as exc:  # RequestError included
            log.warning("connection %d from %s: %s; closing it", conn, peer, exc)
            code = exc.code if isinstance(exc, RequestError) else "bad_message"
            await _try_send(link, ErrorMessage(message=str(exc), code=code))
        except TimeoutError:
            log.info(
                "connection %d from %s: idle for %.0fs, closing it", conn, peer, self.idle_timeout
            )
        except LinkError as exc:
            log.info("connection %d: %s", conn, exc)
        finally:
            for task in tasks:
                task.cancel()
            dropped = [key for key in self.sessions if key[0] == conn]
            for key in dropped:
                del self.sessions[key]
            if dropped:
                log.info("connection %d: dropped %d session(s)", conn, len(dropped))
            self.links.discard(link)
            await link.wait_closed()

    async def _handshake(self, link: Link) -> None:
        first = await link.recv(timeout=HANDSHAKE_TIMEOUT_S)
        if self.cluster_key is not None:
            if not isinstance(first, AuthChallenge):
                raise RequestError(
                    "auth_required",
                    f"worker {self.name} requires the cluster key: give the master the same "
                    "--cluster-key (or CAKE_CLUSTER_KEY)",
                )
            await self._authenticate(link, first)
            hello = await link.recv(timeout=HANDSHAKE_TIMEOUT_S)
        elif isinstance(first, AuthChallenge):
            raise RequestError(
                "auth_unsupported",
                f"worker {self.name} has no cluster key, but the master sent one: start the "
                "worker with the same --cluster-key, or drop it from the master",
            )
        else:
            hello = first
        if not isinstance(hello, Hello):
            raise ProtocolError(f"expected 'hello' first, got {type(hello).__name__!r}")
        if hello.version != PROTOCOL_VERSION:
            raise RequestError(
                "version_mismatch",
                f"protocol version {hello.version} is not this worker's {PROTOCOL_VERSION}; "
                "run the same cake version on master and workers",
            )
        if hello.fingerprint != self.fingerprint:
            raise RequestError(
                "model_mismatch",
                f"worker {self.name} serves a different model (fingerprint {self.fingerprint}, "
                f"master has {hello.fingerprint}); start both with the same model",
            )
        await link.send(
            Welcome(
                fingerprint=self.fingerprint,
                worker=self.name,
                blocks=tuple(self.blocks),
                device=str(self.device),
                dtype=DTYPE_NAMES[self.dtype],
            )
        )
        log.info("master %r connected from %s", hello.master, link.peer)

    async def _authenticate(self, link: Link, challenge: AuthChallenge) -> None:
        assert self.cluster_key is not None
        worker_nonce = new_nonce()
        await link.send(
            AuthResponse(
                nonce=worker_nonce,
                proof=proof(self.cluster_key, "worker", challenge.nonce, worker_nonce),
            )
        )
        answer = await link.recv(timeout=HANDSHAKE_TIMEOUT_S)
        if not isinstance(answer, AuthProof) or not check_proof(
            self.cluster_key, "master", challenge.nonce, worker_nonce, answer.proof
        ):
            raise RequestError(
                "auth_failed", f"cluster key mismatch: the master's key is not worker {self.name}'s"
            )

    async def _forward(self, link: Link, session: Session, request: Forward) -> None:
        try:
            async with session.lock:
                loop = asyncio.get_running_loop()
                hidden, compute_us = await loop.run_in_executor(
                    self.compute, self.run_request, session, request
                )
            await link.send(Result(id=request.id, hidden=hidden, compute_us=compute_us))
        except LinkError:
            pass
        except Exception as exc:  # a failure of ours (out of memory, ...): say so, keep serving
            log.exception("request %d from %s failed", request.id, link.peer)
            reply = ErrorMessage(
                message=f"worker {self.name} failed: {exc}", code="internal", id=request.id
            )
            await _try_send(link, reply)

    def check_request(self, conn: int, request: Forward) -> Session:
        """The session a forward runs in, or RequestError (on the event loop thread)."""
        missing = [b for b in request.blocks if b not in self.served]
        if missing:
            raise RequestError(
                "unknown_block",
                f"worker {self.name} does not serve block(s) {missing}; it serves {self.blocks}",
            )
        hidden = request.hidden
        hidden_size = self.config.hidden_size
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[2] != hidden_size:
            raise RequestError(
                "bad_shape",
                f"hidden states must be (1, T, {hidden_size}), got {list(hidden.shape)}",
            )
        end = request.start_pos + hidden.shape[1]
        if hidden.shape[1] == 0:
            raise RequestError("bad_shape", "hidden states hold no positions (T = 0)")
        if end > self.max_seq_len:
            raise RequestError(
                "context_full",
                f"positions {request.start_pos}..{end - 1} do not fit this worker's context of "
                f"{self.max_seq_len} (worker --max-seq-len)",
            )
        key = (conn, request.session)
        session = self.sessions.get(key)
        if session is None and request.start_pos > 0:
            raise RequestError(
                "unknown_session",
                f"session {request.session} is unknown here (a new session starts at position "
                "0); the worker may have restarted",
            )
        if session is not None and request.start_pos > session.length:
            raise RequestError(
                "bad_position",
                f"start_pos {request.start_pos} skips positions: session {request.session} "
                f"holds {session.length}",
            )
        if session is None:
            if len(self.sessions) >= self.max_sessions:
                raise RequestError(
                    "too_many_sessions",
                    f"worker {self.name} already holds {self.max_sessions} sessions "
                    "(worker --max-sessions)",
                )
            session = self.sessions[key] = Session(self.model.new_cache(self.max_seq_len))
            log.info("connection %d: session %s opened", conn, request.session)
        # Reserve the positions now, so the next step's check (which may come before this
        # one's compute ends) sees them. A forward from an earlier position rolls the session
        # back to it (see protocol.Forward): what lay beyond is gone, whatever it was.
        session.length = end
        return session

    def run_request(self, session: Session, request: Forward) -> tuple[torch.Tensor, int]:
        """Run a checked forward (on the compute thread): hidden states out, microseconds."""
        started = time.perf_counter()
        wire_dtype = request.hidden.dtype
        with torch.inference_mode():
            hidden = request.hidden.to(device=self.device, dtype=self.dtype)
            hidden = self.model.run_blocks(hidden, request.start_pos, session.cache, request.blocks)
            out = hidden.to(device="cpu", dtype=wire_dtype)
        if request.hidden.shape[1] >= LONG_REQUEST:
            release_free_memory()  # a prefill's large activations: back to the system
        return out, int((time.perf_counter() - started) * 1e6)

    async def serve(self, host: str, port: int) -> asyncio.Server:
        server = await asyncio.start_server(self.handle_connection, host, port, ssl=self.tls)
        bound = server.sockets[0].getsockname()
        log.info(
            "worker %s serving blocks %s on %s:%d (%s, %s)",
            self.name,
            format_blocks(self.blocks),
            bound[0],
            bound[1],
            self.device,
            DTYPE_NAMES[self.dtype],
        )
        return server


async def _try_send(link: Link, message: ErrorMessage) -> None:
    with contextlib.suppress(LinkError):
        await link.send(message)


async def run_worker(worker: Worker, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM, then close the listener and every connection."""
    server = await worker.serve(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
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
) -> None:
    """`cake-cli --mode worker`: load this node's blocks (nothing else) and serve them."""
    from cake.auth import cluster_key as parse_key
    from cake.auth import server_tls
    from cake.convert import resolve_model_path
    from cake.devices import resolve_device, resolve_dtype
    from cake.master import DEFAULT_MAX_SEQ_LEN
    from cake.topology import load_topology, parse_address
    from cake.weights import load_llama

    if not name or not topology:
        raise ValueError("worker mode needs --name and --topology (which blocks to serve)")
    node = load_topology(topology).node(name)
    host, port = parse_address(address, "--address") if address else (node.host, node.port)
    key, tls = parse_key(cluster_key), server_tls(tls_cert, tls_key)
    if key is None and not _is_loopback(host):
        log.warning(
            "worker %s listens on %s without a cluster key: anyone who reaches this port can "
            "use it. Set --cluster-key (or CAKE_CLUSTER_KEY) on workers and master.",
            name,
            host,
        )
    folder = resolve_model_path(model)
    config = LlamaConfig.from_folder(folder)
    load_topology(topology).check_fits(config.n_layers)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    seq_len = max_seq_len or min(config.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
    log.info("worker %s: loading blocks %s of %s", name, format_blocks(node.blocks), folder)
    part = load_llama(
        folder,
        node.blocks,
        dtype=torch_dtype,
        device=torch_device,
        max_seq_len=seq_len,
        config=config,
    )
    worker = Worker(
        name,
        part,
        seq_len,
        max_sessions=max_sessions,
        idle_timeout=idle_timeout,
        cluster_key=key,
        tls=tls,
    )
    await run_worker(worker, host, port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
