"""A worker started with no model: it waits for a master to measure it, push it tensors and
assign it blocks.

    cake-cli --mode worker --cluster-key K --address HOST:PORT [--cache-dir DIR]

Every connection starts with the cluster-key handshake (a key is required: an empty worker takes
weights from whoever proves it, so it must know who that is). The first message after it decides
what the connection is:

* ``describe``, ``measure``, ``push_offer``/``push_chunk``, ``assign``, ``ping``: the master's
  control conversation (see protocol.py). Pushes land in a :class:`~cake.cluster.push.ModelCache`.
* ``hello``: forwards. Once assigned, the connection is handed to an ordinary
  :class:`~cake.worker.Worker` that holds the assigned blocks, so serving is the same code as for
  a worker started with ``--model`` and ``--topology``.

The last assignment is remembered in the cache folder: a worker restarted after a crash loads it
again at start, so a master that reconnects (``--retry-timeout``) finds its blocks there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cake.cluster.measure import (
    MEMORY_HEADROOM,
    block_bytes,
    matmul_mflops,
    time_block,
)
from cake.cluster.push import ModelCache
from cake.errors import CakeError, Code, ModelFolderError
from cake.host.cache import cache_root
from cake.host.devices import DTYPE_NAMES, compute_dtype, resolve_device
from cake.host.memory import device_memory
from cake.host.signals import stop_signal
from cake.host.sizes import format_size
from cake.model.config import LlamaConfig
from cake.model.kernels.probe import activations_dtype
from cake.model.opener import open_model
from cake.topology import format_blocks, parse_address
from cake.wire.auth import cluster_key as parse_key
from cake.wire.auth import server_tls
from cake.wire.discovery import DEFAULT_DISCOVERY_PORT, respond
from cake.wire.handshake import check_key
from cake.wire.protocol import (
    HANDSHAKE_MAX_FRAME_BYTES,
    MAX_PUSH_CHUNK_BYTES,
    Assign,
    Assigned,
    AuthChallenge,
    Describe,
    Description,
    ErrorMessage,
    Hello,
    Measure,
    Measured,
    Message,
    Ping,
    Pong,
    ProtocolError,
    PushChunk,
    PushOffer,
    PushStored,
    PushWant,
)
from cake.wire.transport import Link, LinkError
from cake.wire.worker_connection import HANDSHAKE_TIMEOUT_S
from cake.worker import DEFAULT_IDLE_TIMEOUT_S, DEFAULT_MAX_SESSIONS, Worker, write_ready_file

log = logging.getLogger(__name__)

ASSIGNMENT_FILE = "assignment.json"
# After the key handshake: control messages and push chunks (at most MAX_PUSH_CHUNK_BYTES plus
# the envelope).
CONTROL_MAX_FRAME_BYTES = MAX_PUSH_CHUNK_BYTES + (1 << 20)


@dataclass(frozen=True)
class Assignment:
    model: str
    blocks: tuple[int, ...]
    dtype: str
    max_seq_len: int


class EmptyWorker:
    def __init__(
        self,
        name: str,
        cache: ModelCache,
        cluster_key: bytes,
        device: torch.device,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S,
        tls: ssl.SSLContext | None = None,
        max_memory: int | None = None,
    ) -> None:
        self.name = name
        self.max_memory = max_memory
        self.cache = cache
        self.cluster_key = cluster_key
        self.device = device
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.tls = tls
        self.mflops = matmul_mflops(device)
        self.worker: Worker | None = None  # the blocks it serves, once assigned
        self.assignment: Assignment | None = None
        self.links: set[Link] = set()
        self._connections = 0
        self._assigning = asyncio.Lock()

    # ---------------------------------------------------------------------- connections

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._connections += 1
        conn = self._connections
        address = writer.get_extra_info("peername")
        peer = f"{address[0]}:{address[1]}" if address else "peer"
        # A stranger may send only what the key handshake needs; after it, push chunks.
        link = Link(
            reader, writer, peer, max_frame_bytes=HANDSHAKE_MAX_FRAME_BYTES, max_tensor_elements=0
        )
        self.links.add(link)
        handed_over = False
        try:
            await self._authenticate(link)
            link.set_frame_limit(CONTROL_MAX_FRAME_BYTES)
            first = await link.recv(timeout=HANDSHAKE_TIMEOUT_S)
            if isinstance(first, Hello):
                worker = self.worker
                if worker is None:
                    raise CakeError(
                        Code.NOT_ASSIGNED,
                        f"worker {self.name} is empty: start the master with --workers (or "
                        "--discover) so that it assigns blocks and pushes their tensors",
                    )
                self.links.discard(link)
                handed_over = True
                await worker.handle_connection(reader, writer, accepted=(link, first))
                return
            message: Message = first
            while True:
                await self._control(conn, link, message)
                message = await link.recv(timeout=self.idle_timeout)
        except CakeError as exc:  # a refusal, or a ProtocolError: answered, then closed
            log.warning("connection from %s: %s; closing it", peer, exc)
            with contextlib.suppress(LinkError):
                await link.send(ErrorMessage(message=str(exc), code=exc.code.value))
        except TimeoutError:
            log.info("connection from %s: idle, closing it", peer)
        except LinkError as exc:
            log.info("connection from %s: %s", peer, exc)
        finally:
            self.cache.forget(conn)
            if not handed_over:
                self.links.discard(link)
                await link.wait_closed()

    async def _authenticate(self, link: Link) -> None:
        """The worker's half of the cluster-key handshake (see cake/wire/auth.py)."""
        challenge = await link.recv(timeout=HANDSHAKE_TIMEOUT_S)
        if not isinstance(challenge, AuthChallenge):
            raise CakeError(
                Code.AUTH_REQUIRED,
                f"worker {self.name} requires the cluster key: give the master the same "
                "--cluster-key (or CAKE_CLUSTER_KEY)",
            )
        await check_key(link, self.name, self.cluster_key, challenge, HANDSHAKE_TIMEOUT_S)

    async def _control(self, conn: int, link: Link, message: Message) -> None:
        if isinstance(message, Describe):
            await link.send(self.describe(message.id))
        elif isinstance(message, Ping):
            await link.send(Pong(id=message.id))
        elif isinstance(message, Measure):
            await link.send(await self._measure(message))
        elif isinstance(message, PushOffer):
            try:
                offset = await asyncio.to_thread(self.cache.offer, conn, message)
            except CakeError as exc:  # this item only: the push goes on
                await link.send(ErrorMessage(message=str(exc), code=exc.code.value, id=message.id))
                return
            except OSError as exc:
                raise CakeError(
                    Code.DISK, f"worker {self.name} cannot store {message.name}: {exc}"
                ) from None
            await link.send(PushWant(id=message.id, offset=offset))
        elif isinstance(message, PushChunk):
            try:
                done = await asyncio.to_thread(self.cache.write, conn, message)
            except CakeError as exc:  # this item only: the push goes on
                await link.send(ErrorMessage(message=str(exc), code=exc.code.value, id=message.id))
                return
            except OSError as exc:
                raise CakeError(
                    Code.DISK, f"worker {self.name} cannot store a push: {exc}"
                ) from None
            if done:
                await link.send(PushStored(id=message.id))
        elif isinstance(message, Assign):
            await link.send(await self._assign(message))
        else:
            raise ProtocolError(f"an empty worker does not take {type(message).__name__!r} here")

    # ---------------------------------------------------------------------- requests

    def offered_memory(self) -> int:
        """Bytes a master may plan blocks into: --max-memory, or what is free with headroom.
        What the current assignment holds counts as free: a new one replaces it."""
        free = device_memory(self.device).free
        held = 0
        if self.worker is not None:
            # state_dict: the parameters and the quantized weights' buffers (not rope tables)
            weights = self.worker.model.state_dict().values()
            held = sum(t.numel() * t.element_size() for t in weights)
        budget = int(free * MEMORY_HEADROOM) + held
        return min(budget, self.max_memory) if self.max_memory is not None else budget

    def describe(self, request_id: int) -> Description:
        free, total = self.offered_memory(), device_memory(self.device).total
        assigned = self.assignment
        return Description(
            id=request_id,
            worker=self.name,
            device=str(self.device),
            free_memory=free,
            total_memory=total,
            matmul_mflops=self.mflops,
            model=assigned.model if assigned else "",
            blocks=assigned.blocks if assigned else (),
        )

    async def _measure(self, request: Measure) -> Measured | ErrorMessage:
        try:
            config = LlamaConfig.from_dict(json.loads(request.config), source="measure.config")
        except (ValueError, TypeError) as exc:  # ModelFolderError and JSON errors included
            return ErrorMessage(
                message=f"bad config: {exc}", code=Code.BAD_CONFIG.value, id=request.id
            )
        quantized = activations_dtype(self.device) if request.quantize else None
        dtype = compute_dtype(request.dtype, self.device, quantized)
        free = self.offered_memory()
        need = block_bytes(config, dtype, request.positions, request.quantize)
        if need > free:
            return ErrorMessage(
                message=f"worker {self.name}: one block needs {need} bytes, {free} are free",
                code=Code.TOO_LARGE.value,
                id=request.id,
            )
        timing = await asyncio.to_thread(
            time_block, config, dtype, self.device, request.positions, request.quantize
        )
        log.info(
            "measured %.2f ms per block (%s%s, %d positions) for a master",
            timing.block_ms,
            DTYPE_NAMES[dtype],
            f", {request.quantize} weights" if request.quantize else "",
            request.positions,
        )
        return Measured(
            id=request.id,
            block_us=max(int(timing.block_ms * 1000), 1),
            dtype=DTYPE_NAMES[dtype],
            block_bytes=timing.block_bytes,
            free_memory=self.offered_memory(),
        )

    async def _assign(self, request: Assign) -> Assigned | ErrorMessage:
        wanted = Assignment(request.model, request.blocks, request.dtype, request.max_seq_len)
        async with self._assigning:
            if self.assignment != wanted:
                current = self.worker
                if current is not None and current.links:
                    return ErrorMessage(
                        message=f"worker {self.name} is serving another master's blocks "
                        f"{format_blocks(current.blocks)}; try again when it is done",
                        code=Code.BUSY.value,
                        id=request.id,
                    )
                try:
                    await self.load(wanted)
                except (ModelFolderError, ValueError) as exc:
                    return ErrorMessage(
                        message=f"worker {self.name} cannot load blocks "
                        f"{format_blocks(request.blocks)}: {exc}",
                        code=Code.NOT_LOADED.value,
                        id=request.id,
                    )
        return Assigned(id=request.id, blocks=request.blocks)

    async def load(self, assignment: Assignment) -> None:
        """Load the assigned blocks from the cache (in a thread) and serve them from now on."""
        model = open_model(self.cache.folder(assignment.model))
        # A pushed folder holds quantized weights when the master pushed them so (--quantize,
        # a GGUF model): `auto` then computes in bf16, as the quantized kernels do.
        compute = model.compute(str(self.device), assignment.dtype, None, assignment.max_seq_len)
        previous, self.worker, self.assignment = self.worker, None, None
        if previous is not None:
            previous.close()
        log.info(
            "worker %s: loading blocks %s of model %s from %s",
            self.name,
            format_blocks(assignment.blocks),
            assignment.model[:12],
            model.folder,
        )
        part = await asyncio.to_thread(model.load, compute, assignment.blocks)
        self.worker = Worker(
            self.name,
            part,
            assignment.max_seq_len,
            max_sessions=self.max_sessions,
            idle_timeout=self.idle_timeout,
            cluster_key=self.cluster_key,
        )
        self.assignment = assignment
        record = self.cache.root / ASSIGNMENT_FILE
        temporary = record.with_name(record.name + ".tmp")
        temporary.write_text(json.dumps(asdict(assignment)), encoding="utf-8")
        os.replace(temporary, record)
        log.info(
            "worker %s serving blocks %s (%s, %s)",
            self.name,
            format_blocks(assignment.blocks),
            self.device,
            DTYPE_NAMES[compute.dtype],
        )

    async def resume(self) -> None:
        """Load the assignment a previous run of this worker had, if its tensors are here."""
        record = self.cache.root / ASSIGNMENT_FILE
        if not record.is_file():
            return
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
            assignment = Assignment(
                str(data["model"]),
                tuple(int(b) for b in data["blocks"]),
                str(data["dtype"]),
                int(data["max_seq_len"]),
            )
            if not (self.cache.root / assignment.model).is_dir():
                return
            await self.load(assignment)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("not resuming the last assignment from %s: %s", record, exc)

    def close(self) -> None:
        for link in list(self.links):
            link.close()
        if self.worker is not None:
            self.worker.close()


async def start_empty_worker(
    address: str | None,
    cluster_key: str | None,
    cache_dir: str | None,
    name: str | None = None,
    device: str = "auto",
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    discovery_port: int | None = None,
    max_memory: int | None = None,
    ready_file: str | None = None,
) -> None:
    """`cake-cli --mode worker` without --model: serve until SIGINT/SIGTERM. `ready_file`, once
    it listens (and has loaded a remembered assignment): {name, host, port, pid} as JSON."""
    if not address:
        raise ValueError(
            "an empty worker needs --address HOST:PORT to listen on (e.g. 0.0.0.0:10128)"
        )
    key = parse_key(cluster_key)
    if key is None:
        raise ValueError(
            "an empty worker needs --cluster-key (or CAKE_CLUSTER_KEY): it stores and runs "
            "the weights a master pushes, so only a master that knows the key may do that"
        )
    # Port 0: the system picks a free one (tests, several workers on one machine); the log
    # line below and the default name give the real one.
    any_port = address.endswith(":0")
    host, port = parse_address(address[:-2] + ":1" if any_port else address, "--address")
    port = 0 if any_port else port
    tls = server_tls(tls_cert, tls_key)
    torch_device = resolve_device(device)
    root = Path(cache_dir) if cache_dir else cache_root() / "pushed"
    root.mkdir(parents=True, exist_ok=True)
    # The name is the address it listens on (with the real port when port 0 was asked for).
    empty = EmptyWorker(
        name or address,
        ModelCache(root),
        key,
        torch_device,
        max_sessions,
        idle_timeout,
        tls,
        max_memory,
    )
    server = await asyncio.start_server(empty.handle_connection, host, port, ssl=tls)
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    if not name:
        empty.name = f"{host}:{bound_port}"
    udp = None
    if discovery_port != 0:
        udp = await respond(key, empty.name, bound_port, discovery_port or DEFAULT_DISCOVERY_PORT)
    await empty.resume()
    stopped = stop_signal()  # before it says it serves: a signal right after is orderly
    if ready_file is not None:  # before the "serving" line, which scripts may wait for too
        write_ready_file(ready_file, empty.name, bound_host, bound_port)
    free, total = empty.offered_memory(), device_memory(torch_device).total
    log.info(
        "worker %s serving blocks %s on %s:%d (%s; offers %s of %s; %.1f GFLOP/s; cache %s)",
        empty.name,
        format_blocks(empty.assignment.blocks if empty.assignment else []),
        bound_host,
        bound_port,
        torch_device,
        format_size(free),
        format_size(total),
        empty.mflops / 1e3,
        root,
    )
    if empty.assignment is None:
        log.info("worker %s is empty: waiting for a master to assign it blocks", empty.name)
    async with server:
        await stopped
        log.info("worker %s shutting down", empty.name)
        server.close()
        if udp is not None:
            udp.close()
        empty.close()
