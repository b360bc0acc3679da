"""One error base: every code is listed once, every kind carries its code, and a worker's
refusal arrives over the wire with the value of its Code."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
import torch
from cluster import cluster

from cake.errors import (
    SESSION_REFUSALS,
    CakeError,
    Code,
    ContextError,
    ModelFolderError,
    StagesReplaced,
    WorkerError,
    WorkerGone,
    WorkerLost,
)
from cake.faces.api.errors import generation_error
from cake.model.config import LlamaConfig, architecture_of
from cake.topology import TopologyError, load_topology
from cake.wire.protocol import (
    BatchResult,
    ErrorMessage,
    Forward,
    ForwardBatch,
    Hello,
    ProtocolError,
    Welcome,
    fingerprint_config,
)
from cake.wire.transport import Link, open_link


def test_codes_are_unique_snake_case() -> None:
    values = [code.value for code in Code]
    assert len(values) == len(set(values)) == len(Code.__members__)  # no aliases
    for code in Code:
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", code.value), code
        assert code.name == code.value.upper()


KINDS = [
    (WorkerError, Code.WORKER_FAILED, RuntimeError),
    (WorkerLost, Code.WORKER_LOST, WorkerError),
    (WorkerGone, Code.WORKER_GONE, WorkerError),
    (StagesReplaced, Code.STAGES_REPLACED, WorkerError),
    (ContextError, Code.CONTEXT_EXCEEDED, ValueError),
    (ModelFolderError, Code.BAD_MODEL_FOLDER, ValueError),
    (TopologyError, Code.BAD_TOPOLOGY, ValueError),
    (ProtocolError, Code.BAD_MESSAGE, CakeError),
]


@pytest.mark.parametrize(("kind", "code", "also"), KINDS, ids=[k[0].__name__ for k in KINDS])
def test_each_kind_carries_its_code(kind: type[CakeError], code: Code, also: type) -> None:
    error = kind("the cause; the fix")
    assert isinstance(error, CakeError) and isinstance(error, also)
    assert error.code is code
    assert str(error) == "the cause; the fix"


def test_a_plain_cake_error_takes_any_code() -> None:
    error = CakeError(Code.KV_MEMORY_FULL, "no room; raise --kv-memory")
    assert error.code is Code.KV_MEMORY_FULL and str(error) == "no room; raise --kv-memory"
    assert error.code == "kv_memory_full"  # a str enum: equal to its wire value
    with pytest.raises(ValueError):
        CakeError("no_such_code", "x")  # type: ignore[arg-type]


def test_the_api_answers_session_refusals_503_and_worker_failures_502() -> None:
    for code in SESSION_REFUSALS:
        answer = generation_error(CakeError(code, "full"), param="messages")
        assert (answer.status, answer.body["code"]) == (503, code.value)
    assert generation_error(WorkerLost("gone"), param="messages").status == 502
    assert generation_error(ContextError("too long"), param="messages").status == 400


async def _greet(link: Link, fingerprint: str) -> object:
    await link.send(Hello(fingerprint=fingerprint, master="test_errors"))
    return await link.recv(timeout=10)


def test_a_worker_refusal_arrives_with_its_code(tiny_llama: Path, tmp_path: Path) -> None:
    config = LlamaConfig.from_folder(tiny_llama)
    fingerprint = fingerprint_config(architecture_of(config))
    hidden = torch.zeros(1, 1, config.hidden_size)

    async def run() -> None:
        async with cluster(tiny_llama, tmp_path, {"w1": ["model.layers.0-1"]}) as (topology, _):
            port = load_topology(str(topology)).node("w1").port
            link = await open_link("127.0.0.1", port, "w1", timeout=10)
            try:
                assert isinstance(await _greet(link, fingerprint), Welcome)
                await link.send(
                    Forward(id=1, session="s", start_pos=0, blocks=(2, 3), hidden=hidden)
                )
                refused = await link.recv(timeout=10)
                assert isinstance(refused, ErrorMessage) and refused.id == 1
                assert refused.code == Code.UNKNOWN_BLOCK.value
                await link.send(
                    ForwardBatch(
                        id=2,
                        sessions=("new", "old"),
                        start_positions=(0, 7),
                        lengths=(1, 1),
                        blocks=(0, 1),
                        hidden=torch.zeros(1, 2, config.hidden_size),
                    )
                )
                batch = await link.recv(timeout=10)
                assert isinstance(batch, BatchResult)
                assert (batch.failed, batch.codes) == ((1,), (Code.UNKNOWN_SESSION.value,))
            finally:
                await link.wait_closed()
            link = await open_link("127.0.0.1", port, "w1", timeout=10)
            try:
                refused = await _greet(link, "0" * 16)
                assert isinstance(refused, ErrorMessage)
                assert refused.code == Code.MODEL_MISMATCH.value
            finally:
                await link.wait_closed()

    asyncio.run(run())


def test_a_connection_reset_as_it_opens_is_a_lost_link_not_an_os_error() -> None:
    """A worker that dies while the master reconnects can leave the new socket closed before
    the Link sets its options: EBADF there escaped the reconnect loop as a bare OSError and
    ended the CLI ('error: [Errno 9] Bad file descriptor'). The Link must still be built; its
    first read or write reports the loss."""
    import errno
    import socket as socket_module

    class ClosedSocket:
        family = socket_module.AF_INET

        def setsockopt(self, *args: object) -> None:
            raise OSError(errno.EBADF, "Bad file descriptor")

    class Writer:
        def get_extra_info(self, name: str) -> object:
            return ClosedSocket() if name == "socket" else None

    async def build() -> Link:  # a StreamReader belongs to a running loop
        return Link(asyncio.StreamReader(), Writer(), "peer")  # type: ignore[arg-type]

    assert asyncio.run(build()).peer == "peer"
