"""Per-hop overhead: one decode-sized round trip over loopback, with no model compute in it.

    .venv/bin/python -m bench.hop [--trips 2000]

The master side is cake's own `RemoteStage.forward` (what a decode step runs per worker: the
Forward message, its frame, `Link`, the client's reader task and future); the far side is a
minimal echo peer in its own process, built from `cake.wire.transport.Link` and
`cake.wire.protocol`, that answers each `forward` with a `result` carrying the same hidden
states. So a round trip is framing + asyncio + socket.

The split: `encode` is building the message and its frame (`Forward(...)`, `to_wire`,
`encode_frame`), `decode` is `FrameDecoder.feed` + `parse_message`; both are timed in this
process on the same messages and counted for both ends (the Forward and the Result). `socket`
is the rest of the round trip: both event loops, the reader task hand-off, system calls, kernel.

The round trips run in 5 batches (a new connection each); the goal uses the best batch's
median, since a burst of load from other processes can spoil a batch. The same round trip is
also timed after 20 ms of idling (about one decode step), as a worker
sees it in a generation: waking a sleeping process and cold caches cost more than the code.

Two floors put `socket` in context, with the same frame bytes bouncing off the same peer
process: plain asyncio streams (`readexactly`/`write`, no cake code) and plain blocking sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import torch

from cake.engine.remote_stage import RemoteStage
from cake.engine.stages import StageRow, StageTimes
from cake.topology import Node
from cake.wire.protocol import (
    CloseSession,
    Forward,
    FrameDecoder,
    Hello,
    Ping,
    Pong,
    Result,
    Welcome,
    encode_frame,
    parse_message,
)
from cake.wire.transport import Link, LinkError
from cake.wire.worker_link import WorkerClient

log = logging.getLogger("bench")

HIDDEN_SIZES = (576, 2048)  # SmolLM2-135M, Llama 3.2 1B
WARMUP_TRIPS = 100
# In a generation a worker idles while the others compute: a round trip after such a pause (a
# decode step's length) pays for waking a sleeping process and cold caches, unlike back to back.
IDLE_GAP_S = 0.02
IDLE_TRIPS = 200
BATCHES = 5
PREFIX_BYTES = 4

# --- the echo peer: `python -m bench.hop --serve` prints its three ports and serves ----------


async def _cake_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A worker that runs no blocks: handshake, then every Forward's hidden states come back."""
    link = Link(reader, writer, "master")
    try:
        hello = await link.recv()
        assert isinstance(hello, Hello), hello
        welcome = Welcome(
            fingerprint=hello.fingerprint, worker="echo", blocks=(0,), device="cpu", dtype="f32"
        )
        await link.send(welcome)
        while True:
            message = await link.recv()
            if isinstance(message, Forward):
                await link.send(Result(id=message.id, hidden=message.hidden))
            elif isinstance(message, Ping):  # the master's heartbeat on an idle link
                await link.send(Pong(id=message.id))
            elif not isinstance(message, CloseSession):
                raise ValueError(f"echo peer: unexpected {type(message).__name__}")
    except LinkError:
        pass  # the master went away
    finally:
        await link.wait_closed()


async def _streams_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    _nodelay(writer.get_extra_info("socket"))
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            prefix = await reader.readexactly(PREFIX_BYTES)
            writer.write(prefix + await reader.readexactly(int.from_bytes(prefix, "big")))
    writer.close()


def _blocking_echo(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        _nodelay(conn)
        with conn:
            while prefix := _read_exactly(conn, PREFIX_BYTES):
                conn.sendall(prefix + _read_exactly(conn, int.from_bytes(prefix, "big")))


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return b""
        data += chunk
    return bytes(data)


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def serve_echo() -> None:
    blocking = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_blocking_echo, args=(blocking,), daemon=True).start()
    cake = await asyncio.start_server(_cake_echo, "127.0.0.1", 0)
    streams = await asyncio.start_server(_streams_echo, "127.0.0.1", 0)
    ports = [server.sockets[0].getsockname()[1] for server in (cake, streams)]
    print(*ports, blocking.getsockname()[1], flush=True)
    async with cake, streams:
        await asyncio.gather(cake.serve_forever(), streams.serve_forever())


# --- the master side ------------------------------------------------------------------------


def _median_us(action: Callable[[], object], repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds) * 1e6


def codec_costs(hidden: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median microseconds to encode and to decode a decode step's Forward and Result."""

    def forward() -> Forward:
        return Forward(
            id=1, session="s" * 32, start_pos=600, blocks=tuple(range(15)), hidden=hidden
        )

    def result() -> Result:
        return Result(id=1, hidden=hidden, compute_us=1000)

    def decoding(frame: bytes) -> Callable[[], object]:
        return lambda: parse_message(FrameDecoder().feed(frame)[0])

    forward_frame = encode_frame(forward().to_wire())
    result_frame = encode_frame(result().to_wire())
    return {
        "encode_forward_us": _median_us(lambda: encode_frame(forward().to_wire()), repeats),
        "encode_result_us": _median_us(lambda: encode_frame(result().to_wire()), repeats),
        "decode_forward_us": _median_us(decoding(forward_frame), repeats),
        "decode_result_us": _median_us(decoding(result_frame), repeats),
        "forward_frame_bytes": len(forward_frame),
        "result_frame_bytes": len(result_frame),
    }


async def cake_trips_us(
    port: int, hidden: torch.Tensor, trips: int, idle_s: float = 0.0
) -> list[float]:
    """Microseconds of each RemoteStage.forward against the cake echo peer, after `idle_s`."""
    node = Node(name="echo", host="127.0.0.1", port=port, description="", blocks=(0,))
    stage = RemoteStage(WorkerClient(node, "echo"), range(0, 1))
    await stage.client.connect()
    times, elapsed = StageTimes(), []
    try:
        for position in range(WARMUP_TRIPS + trips):
            if idle_s:
                await asyncio.sleep(idle_s)
            started = time.perf_counter()
            await stage.forward([StageRow("hop", position, hidden.shape[1], times)], hidden)
            elapsed.append(time.perf_counter() - started)
        await stage.close_session("hop")
    finally:
        await stage.close()
    return [s * 1e6 for s in elapsed[WARMUP_TRIPS:]]


async def streams_trips_us(port: int, frame: bytes, trips: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    _nodelay(writer.get_extra_info("socket"))
    elapsed = []
    for _ in range(WARMUP_TRIPS + trips):
        started = time.perf_counter()
        writer.write(frame)
        await writer.drain()
        await reader.readexactly(len(frame))
        elapsed.append(time.perf_counter() - started)
    writer.close()
    return [s * 1e6 for s in elapsed[WARMUP_TRIPS:]]


def blocking_trips_us(port: int, frame: bytes, trips: int) -> list[float]:
    elapsed = []
    with socket.create_connection(("127.0.0.1", port)) as conn:
        _nodelay(conn)
        for _ in range(WARMUP_TRIPS + trips):
            started = time.perf_counter()
            conn.sendall(frame)
            _read_exactly(conn, len(frame))
            elapsed.append(time.perf_counter() - started)
    return [s * 1e6 for s in elapsed[WARMUP_TRIPS:]]


def hop_row(ports: list[int], size: int, trips: int) -> dict:
    hidden = torch.randn(1, 1, size, dtype=torch.float32)  # (B, T=1, C): one decode step
    frame = encode_frame(Result(id=1, hidden=hidden).to_wire())
    # In batches, so that a burst of load from other processes spoils one batch, not the figure.
    batches = [
        asyncio.run(cake_trips_us(ports[0], hidden, trips // BATCHES)) for _ in range(BATCHES)
    ]
    cake = [us for batch in batches for us in batch]
    idle_trips = min(trips, IDLE_TRIPS)
    after_idle = asyncio.run(cake_trips_us(ports[0], hidden, idle_trips, IDLE_GAP_S))
    streams = asyncio.run(streams_trips_us(ports[1], frame, trips))
    blocking = blocking_trips_us(ports[2], frame, trips)
    costs = codec_costs(hidden, trips)
    encode = costs["encode_forward_us"] + costs["encode_result_us"]
    decode = costs["decode_forward_us"] + costs["decode_result_us"]
    median = statistics.median(cake)
    return {
        "hidden_size": size,
        "trips": trips,
        "round_trip_us": median,
        "best_batch_us": min(statistics.median(batch) for batch in batches),
        "batches": BATCHES,
        "p10_us": _quantile(cake, 0.1),
        "p90_us": _quantile(cake, 0.9),
        "encode_us": encode,
        "decode_us": decode,
        "socket_us": median - encode - decode,
        "after_idle_us": statistics.median(after_idle),
        "idle_gap_ms": IDLE_GAP_S * 1e3,
        "asyncio_streams_us": statistics.median(streams),
        "blocking_socket_us": statistics.median(blocking),
        **costs,
    }


def measure_hop(trips: int = 2000, hidden_sizes: tuple[int, ...] = HIDDEN_SIZES) -> list[dict]:
    """One row per hidden size: the median round trip, its split and the two floors."""
    peer = subprocess.Popen(
        [sys.executable, "-m", "bench.hop", "--serve"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert peer.stdout is not None
        ports = [int(port) for port in peer.stdout.readline().split()]
        rows = []
        for size in hidden_sizes:
            log.info("per-hop: %d round trips of a (1, 1, %d) f32 hidden state", trips, size)
            rows.append(hop_row(ports, size, trips))
        return rows
    finally:
        peer.terminate()
        try:
            peer.wait(5)
        except subprocess.TimeoutExpired:
            peer.kill()
            peer.wait()


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description="Per-hop overhead of cake's wire path.")
    parser.add_argument("--serve", action="store_true", help="run the echo peer (internal)")
    parser.add_argument("--trips", type=int, default=2000)
    options = parser.parse_args()
    if options.serve:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_echo())
        return
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="[bench] %(message)s")
    for row in measure_hop(options.trips):
        print(
            f"hidden {row['hidden_size']}: round trip {row['round_trip_us']:.1f} us "
            f"= encode {row['encode_us']:.1f} + decode {row['decode_us']:.1f} "
            f"+ socket {row['socket_us']:.1f} (p10 {row['p10_us']:.1f}, p90 {row['p90_us']:.1f}); "
            f"after {row['idle_gap_ms']:g} ms idle {row['after_idle_us']:.1f}; "
            f"floors: asyncio streams {row['asyncio_streams_us']:.1f}, "
            f"blocking sockets {row['blocking_socket_us']:.1f}"
        )


if __name__ == "__main__":
    main()
