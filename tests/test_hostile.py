"""A live worker process fed hostile bytes and messages: each gets an error reply where one is
possible; a peer that breaks the protocol loses its connection, a request the worker refuses
leaves the connection (which a master's other sessions share) serving; and the worker keeps
serving everyone else correctly."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest
import torch
from cluster import N_TOKENS, generate
from helpers import greedy_tokens

from cake.cluster.local_cluster import WorkerProcess, start_local_cluster
from cake.master import Master, MasterSettings
from cake.model.config import LlamaConfig, architecture_of
from cake.wire.protocol import (
    Forward,
    FrameDecoder,
    Hello,
    Ping,
    encode_frame,
    fingerprint_config,
    tensor_to_wire,
)

HIDDEN = 64  # tiny_llama's hidden size
CONTEXT = 64  # the worker's --max-seq-len here


@pytest.fixture(scope="module")
def worker(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    topology = tmp_path_factory.mktemp("hostile") / "topology.yml"
    extra = (
        "--device",
        "cpu",
        "--max-seq-len",
        str(CONTEXT),
        "--max-sessions",
        "2",
        "--idle-timeout",
        "3",
    )
    (process,) = start_local_cluster(tiny_llama, {"w1": ["model.layers.0-3"]}, topology, extra)
    process.topology = topology
    yield process
    process.stop()


@pytest.fixture(scope="module")
def hello(tiny_llama: Path) -> bytes:
    fingerprint = fingerprint_config(architecture_of(LlamaConfig.from_folder(tiny_llama)))
    return encode_frame(Hello(fingerprint=fingerprint, master="hostile-test").to_wire())


def frame(message: dict) -> bytes:
    return encode_frame(message)


def raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def forward(
    session: str = "s",
    start_pos: int = 0,
    blocks=(0, 1),
    tokens: int = 1,
    hidden_size: int = HIDDEN,
    **wire_overrides: object,
) -> bytes:
    message = Forward(
        id=1,
        session=session,
        start_pos=max(start_pos, 0),
        blocks=blocks,
        hidden=torch.randn(1, tokens, hidden_size),
    ).to_wire()
    if start_pos < 0:
        message["start_pos"] = start_pos
    message.update(wire_overrides)
    return frame(message)


PING = encode_frame(Ping(id=99).to_wire())


def exchange(
    port: int,
    payload: bytes,
    hello: bytes | None,
    wait: float = 15.0,
    half_close: bool = False,
    until: Callable[[list[dict]], bool] | None = None,
) -> tuple[list[dict], bool]:
    """Send (hello +) payload; read replies until the worker closes, `until(replies)` holds
    (the connection is then still open), or `wait` passes. (replies, closed by the worker)."""
    decoder = FrameDecoder()
    replies: list[dict] = []
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        if hello is not None:  # the handshake first, so the payload arrives on its own
            sock.sendall(hello)
            while not replies:
                replies.extend(decoder.feed(sock.recv(1 << 16)))
            assert replies.pop(0)["type"] == "welcome", replies
        sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        try:
            while until is None or not until(replies):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    return replies, True
                replies.extend(decoder.feed(chunk))
        except TimeoutError:
            return replies, False
        except ConnectionResetError:  # closed with unread bytes still in its buffer
            return replies, True
    return replies, False


def answered_ping(replies: list[dict]) -> bool:
    return any(r["type"] == "pong" for r in replies) and any(r["type"] == "error" for r in replies)


def tensor(dtype: str = "f32", shape=(1, 1, HIDDEN), data: bytes | None = None) -> dict:
    wire = tensor_to_wire(torch.zeros(shape))
    wire["dtype"] = dtype
    if data is not None:
        wire["data"] = data
    return wire


def forward_with(**fields: object) -> bytes:
    message = {
        "type": "forward",
        "id": 1,
        "session": "s",
        "start_pos": 0,
        "blocks": [0],
        "hidden": tensor(),
    }
    message.update(fields)
    return frame(message)


# A peer that breaks the protocol (bytes that are no frame, a message that is no message) loses
# its connection after the error reply. A well-formed request the worker refuses (an unknown
# session, a block it does not serve, ...) gets an error reply with its id, and the connection
# serves on: a master's other sessions share it.
CLOSES, SERVES_ON = True, False

CASES: dict[str, tuple[Callable[[], bytes], bool, str | None, bool]] = {
    # name: (payload, send hello first, expected error fragment, closes the connection)
    "random bytes": (lambda: random.Random(0).randbytes(4096), False, "exceeds the limit", CLOSES),
    "no hello first": (lambda: forward(), False, "expected 'hello' first", CLOSES),
    "length prefix of 4 GB": (
        lambda: b"\xff\xff\xff\xff" + b"\0" * 16,
        True,
        "exceeds the limit",
        CLOSES,
    ),
    "msgpack list, not a map": (lambda: raw_frame(msgpack.packb([1, 2, 3])), True, "map", CLOSES),
    "not msgpack at all": (lambda: raw_frame(b"\xc1\xc1\xc1"), True, "not valid msgpack", CLOSES),
    "unknown message type": (
        lambda: frame({"type": "launch"}),
        True,
        "unknown message type",
        CLOSES,
    ),
    "field of the wrong type": (lambda: forward_with(blocks="abc"), True, "'blocks'", CLOSES),
    "missing field": (lambda: frame({"type": "forward", "id": 1}), True, "missing field", CLOSES),
    "wrong dtype": (lambda: forward_with(hidden=tensor("i64")), True, "not allowed", CLOSES),
    "bytes do not match shape": (
        lambda: forward_with(hidden=tensor(data=b"\0" * 12)),
        True,
        "needs 256 bytes",
        CLOSES,
    ),
    "huge shape": (
        lambda: forward_with(hidden=tensor(shape=(1, 10**6, HIDDEN), data=b"")),
        True,
        "exceeds the limit",
        CLOSES,
    ),
    "negative position": (lambda: forward(start_pos=-3), True, "start_pos", CLOSES),
    "a worker's message from a master": (
        lambda: frame({"type": "pong", "id": 1}),
        True,
        "does not send",
        CLOSES,
    ),
    "hidden size of another model": (
        lambda: forward(hidden_size=32),
        True,
        "must be (1, T, 64)",
        SERVES_ON,
    ),
    "unknown session": (lambda: forward(start_pos=5), True, "unknown", SERVES_ON),
    "block it does not serve": (lambda: forward(blocks=(4, 5)), True, "does not serve", SERVES_ON),
    "positions past the context": (
        lambda: forward(tokens=40) + forward(start_pos=40, tokens=40),
        True,
        "do not fit",
        SERVES_ON,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_gets_an_error_and_only_a_protocol_error_closes(
    name: str, worker: WorkerProcess, hello: bytes
) -> None:
    make_payload, send_hello, error, closes = CASES[name]
    if closes:
        replies, closed = exchange(worker.port, make_payload(), hello if send_hello else None)
        assert closed, f"the worker kept the connection open after {name}"
    else:  # a ping after the request: its pong says the connection still serves
        replies, closed = exchange(worker.port, make_payload() + PING, hello, until=answered_ping)
        assert not closed, f"the worker closed the connection after {name}"
        assert {"type": "pong", "id": 99} in replies, replies
    errors = [r for r in replies if r["type"] == "error"]
    assert errors, f"no error reply for {name}: {replies}"
    assert error in errors[-1]["message"]
    if not closes:
        assert errors[-1]["id"] == 1  # the refused request's id: its session alone fails


def test_truncated_frame_closes_quietly(worker: WorkerProcess, hello: bytes) -> None:
    payload = forward()[:40]
    _, closed = exchange(worker.port, payload, hello, half_close=True)
    assert closed


@pytest.mark.slow  # waits out the worker's --idle-timeout
def test_idle_connection_is_closed(worker: WorkerProcess, hello: bytes) -> None:
    replies, closed = exchange(worker.port, b"", hello, wait=10)
    assert closed and replies == []


def test_session_limit_refuses_the_third_session(worker: WorkerProcess, hello: bytes) -> None:
    payload = forward(session="a") + forward(session="b") + forward(session="c")
    replies, _ = exchange(worker.port, payload, hello, until=lambda replies: len(replies) == 3)
    assert sorted(r["type"] for r in replies) == ["error", "result", "result"]
    (error,) = [r for r in replies if r["type"] == "error"]
    assert error["code"] == "too_many_sessions"
    assert "already holds 2 sessions" in error["message"]


def test_worker_still_serves_correctly_after_all_that(
    worker: WorkerProcess, hello: bytes, tiny_llama: Path
) -> None:
    for make_payload, send_hello, _, closes in CASES.values():
        if closes:
            exchange(worker.port, make_payload(), hello if send_hello else None)
        else:
            exchange(worker.port, make_payload() + PING, hello, until=answered_ping)

    async def run() -> list[int]:
        master = await Master.open(
            MasterSettings(
                tiny_llama, worker.topology, device="cpu", dtype="f32", max_seq_len=CONTEXT
            )
        )
        try:
            return (await generate(master, "hi"))[0]
        finally:
            await master.close()

    assert asyncio.run(run()) == greedy_tokens(tiny_llama, "hi", N_TOKENS)
    assert worker.proc.poll() is None
    assert "Traceback" not in worker.log
