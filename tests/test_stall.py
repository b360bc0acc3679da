"""A worker process that freezes (SIGSTOP) with its socket open: a short stall gives the same
text (the heartbeat notices, the master reconnects and replays once the worker thaws); a stall
that lasts ends the generation with the named error, within --retry-timeout of the freeze."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import GREEDY
from helpers import greedy_tokens

from cake.cluster.local_cluster import WorkerProcess, worker_command
from cake.decoding.stats import GenerationStats
from cake.errors import WorkerError
from cake.master import Master, MasterSettings
from cake.wire.liveness import LivenessSettings

N = 30

pytestmark = pytest.mark.slow  # worker processes, frozen with SIGSTOP
LIVENESS = LivenessSettings.for_heartbeat_timeout(1.0)  # small, so the tests stay fast


class Workers:
    def __init__(self, model: Path, folder: Path) -> None:
        self.model, self.topology = model, folder / "topology.yml"
        layers = {"w1": "model.layers.0-1", "w2": "model.layers.2-3"}
        spec = {
            name: f"  host: '127.0.0.1:1'\n  layers: ['{entry}']\n"
            for name, entry in layers.items()
        }
        self.topology.write_text("".join(f"{name}:\n{body}" for name, body in spec.items()))
        self.ready_files = {name: folder / f"{name}.ready.json" for name in layers}
        self.processes = {
            name: WorkerProcess(
                name,
                worker_command(
                    model,
                    name,
                    self.topology,
                    "127.0.0.1:0",
                    ("--device", "cpu", "--ready-file", str(self.ready_files[name])),
                ),
                {**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            for name in layers
        }
        for process in self.processes.values():
            process.wait_ready()
        ports = {name: p.port for name, p in self.processes.items()}
        self.topology.write_text(
            "".join(
                f"{name}:\n  host: '127.0.0.1:{ports[name]}'\n  layers: ['{entry}']\n"
                for name, entry in layers.items()
            )
        )

    def pid(self, name: str) -> int:
        return self.processes[name].proc.pid

    def stop(self) -> None:
        for process in self.processes.values():
            if process.proc.poll() is None:
                os.kill(process.proc.pid, signal.SIGCONT)
            process.stop()


@pytest.fixture(scope="module")
def workers(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    cluster = Workers(tiny_llama, tmp_path_factory.mktemp("stall"))
    yield cluster
    cluster.stop()


def test_ready_file_names_the_port_the_worker_bound(workers: Workers) -> None:
    for name, path in workers.ready_files.items():
        ready = json.loads(path.read_text())
        assert ready == {
            "name": name,
            "host": "127.0.0.1",
            "port": workers.processes[name].port,  # the port its log line reported
            "pid": workers.pid(name),
        }


async def generate_with_stall(
    workers: Workers, stall_s: float | None, retry_timeout: float
) -> tuple[list[int], GenerationStats]:
    """Generate N tokens; after 8, freeze w2 for `stall_s` seconds (None: for good)."""
    master = await Master.open(
        MasterSettings(
            workers.model,
            workers.topology,
            device="cpu",
            dtype="f32",
            retry_timeout=retry_timeout,
            liveness=LIVENESS,
        ),
    )
    stats, tokens = GenerationStats(), []
    thaw = threading.Timer(stall_s or 0, os.kill, (workers.pid("w2"), signal.SIGCONT))
    try:
        async for token in master.generate(master.encode("hi"), GREEDY, N, True, stats):
            tokens.append(token)
            if len(tokens) == 8:
                os.kill(workers.pid("w2"), signal.SIGSTOP)
                if stall_s is not None:
                    thaw.start()
    finally:
        thaw.cancel()
        await master.close()
    return tokens, stats


def test_short_stall_gives_the_same_text(workers: Workers) -> None:
    expected = greedy_tokens(workers.model, "hi", N)
    tokens, stats = asyncio.run(
        asyncio.wait_for(generate_with_stall(workers, stall_s=3.0, retry_timeout=30), 120)
    )
    assert tokens == expected  # same text, no token twice
    # The stall was noticed (heartbeat) and w2's stage replayed: more than 2 trips per step.
    assert stats.round_trips > 2 * (stats.decode_steps + 1)


def test_permanent_stall_ends_with_the_named_error(workers: Workers) -> None:
    try:
        with pytest.raises(
            WorkerError,
            match=r"worker w2 at 127\.0\.0\.1:\d+ did not come back within 2s \(--retry-timeout\)",
        ):
            # The outer bound only guards against a hang; the error comes at about 2 s.
            asyncio.run(
                asyncio.wait_for(generate_with_stall(workers, stall_s=None, retry_timeout=2), 60)
            )
    finally:
        os.kill(workers.pid("w2"), signal.SIGCONT)
