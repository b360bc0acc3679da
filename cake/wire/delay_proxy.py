"""A TCP proxy that delays every chunk by a set time, in each direction, order kept.

For tests and benchmarks of latency on machines without `tc netem`: put it between the master
and a worker and the link behaves like one with a round-trip time of 2 x `delay_s` (bandwidth
is not limited). Each chunk read is stamped, queued, and written once its time has come, so
chunks are never reordered and back-to-back chunks are not serialised behind each other's delay.

    python -m cake.wire.delay_proxy --listen 127.0.0.1:0 --target 127.0.0.1:10128 --delay-ms 10

prints `delay proxy 127.0.0.1:PORT -> 127.0.0.1:10128, 10.0 ms each way` on stderr when ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import sys
import threading
import time

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 16


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Copy reader -> writer, each chunk `delay_s` after it arrived; EOF is delayed likewise."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        while True:
            data = await reader.read(CHUNK_BYTES)
            queue.put_nowait((time.monotonic() + delay_s, data))
            if not data:
                return

    async def write() -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    reading = asyncio.create_task(read())
    try:
        await write()
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError, ConnectionError):
            await reading


class DelayProxy:
    """Listens on `listen_host:listen_port` (0: any free port) and forwards to the target."""

    def __init__(self, target_host: str, target_port: int, delay_s: float) -> None:
        if delay_s < 0:
            raise ValueError(f"delay must be >= 0 seconds, got {delay_s}")
        self.target_host, self.target_port = target_host, target_port
        self.delay_s = delay_s
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self.connections: set[asyncio.Task] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self.server = await asyncio.start_server(self._serve, host, port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        task.add_done_callback(self.connections.discard)
        try:
            target_r, target_w = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError as exc:
            log.warning(
                "delay proxy: cannot reach %s:%d: %s", self.target_host, self.target_port, exc
            )
            client_w.close()
            return
        for writer in (client_w, target_w):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pumps = [
            asyncio.create_task(_pump(client_r, target_w, self.delay_s)),
            asyncio.create_task(_pump(target_r, client_w, self.delay_s)),
        ]
        try:
            # A clean close (EOF) passes through, delayed, and the pair ends when both sides
            # have closed; a reset on either side ends both at once.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in pumps:
                task.cancel()
            for writer in (client_w, target_w):
                writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.connections):
            task.cancel()
        await asyncio.gather(*self.connections, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()


class ThreadedDelayProxy:
    """A DelayProxy on its own event loop in a daemon thread (for tests and the benchmark), so
    the delays do not depend on how busy the caller's loop is."""

    def __init__(self, target_host: str, target_port: int, delay_s: float) -> None:
        self.proxy = DelayProxy(target_host, target_port, delay_s)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self.proxy.start(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


async def _main(listen: tuple[str, int], target: tuple[str, int], delay_ms: float) -> None:
    proxy = DelayProxy(*target, delay_ms / 1000)
    port = await proxy.start(*listen)
    print(
        f"delay proxy {listen[0]}:{port} -> {target[0]}:{target[1]}, {delay_ms:g} ms each way",
        file=sys.stderr,
        flush=True,
    )
    assert proxy.server is not None
    await proxy.server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=_address, default=("127.0.0.1", 0), help="HOST:PORT")
    parser.add_argument("--target", type=_address, required=True, help="HOST:PORT")
    parser.add_argument(
        "--delay-ms", type=float, required=True, help="one-way delay (RTT = 2x this)"
    )
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error("--delay-ms must be >= 0")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args.listen, args.target, args.delay_ms))


if __name__ == "__main__":
    main()
