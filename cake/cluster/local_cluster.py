"""Worker processes on this machine: for the demo, the benchmark and the tests.

Each worker is `python -m cake.cli --mode worker ...` in its own process; we wait for its
"serving blocks ... on HOST:PORT" log line, keep its stderr (for error messages), and stop it
with SIGTERM (SIGKILL if it hangs). `start_local_cluster` lets each worker bind port 0 and
writes the topology from the ports they report, so no port is guessed (and none raced for).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

READY = re.compile(r"serving blocks \S+ on (\S+):(\d+)")


class WorkerProcess:
    def __init__(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = args
        self.lines: list[str] = []
        self.heard: list[float] = []  # when each line arrived (time.perf_counter), for timelines
        self.started = time.perf_counter()
        self.port: int | None = None
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.heard.append(time.perf_counter())
            self.lines.append(line.rstrip("\n"))
            match = READY.search(line)
            if match:
                self.port = int(match.group(2))
                self._ready.set()
        self._ready.set()  # the process ended: stop waiting

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, timeout: float = 120.0) -> None:
        if not self._ready.wait(timeout) or self.port is None:
            self.stop()
            raise RuntimeError(
                f"worker {self.name} did not start within {timeout:g}s; its log:\n{self.log}"
            )

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._drain.join(timeout=5)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self.proc.kill()
        self.proc.wait()


def worker_command(
    model: str | Path,
    name: str,
    topology: str | Path,
    address: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "cake.cli",
        "--model",
        str(model),
        "--mode",
        "worker",
        "--name",
        name,
        "--topology",
        str(topology),
        *extra,
    ]
    return [*args, "--address", address] if address else args


def start_workers(
    model: str | Path,
    topology: str | Path,
    names: Sequence[str],
    extra: Sequence[str] = ("--device", "cpu"),
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    address: str | None = None,
) -> list[WorkerProcess]:
    """Start one process per worker name and wait until all of them serve.

    `address` overrides the topology's (e.g. '127.0.0.1:0': each binds a free port).
    """
    env = env or {**os.environ, "PYTHONUNBUFFERED": "1"}
    workers = [
        WorkerProcess(name, worker_command(model, name, topology, address, extra=extra), env)
        for name in names
    ]
    try:
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.wait_ready(max(deadline - time.monotonic(), 1.0))
    except BaseException:
        for worker in workers:
            worker.stop()
        raise
    return workers


def start_local_cluster(
    model: str | Path,
    layers: Mapping[str, Sequence[str]],
    topology: Path,
    extra: Sequence[str] = ("--device", "cpu"),
    env: dict[str, str] | None = None,
    host: str = "127.0.0.1",
    timeout: float = 120.0,
) -> list[WorkerProcess]:
    """Worker processes on `host`, each on a port of its own choosing, and `topology` naming them.

    `layers` maps worker names to their topology entries (e.g. ['model.layers.0-3']). The
    topology is written twice: first with a placeholder port (a worker reads only its blocks
    from it), then with the port each worker reported.
    """
    spec = {
        name: {"host": f"{host}:1", "layers": list(entries)} for name, entries in layers.items()
    }
    topology.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    workers = start_workers(
        model, topology, list(layers), extra=extra, timeout=timeout, env=env, address=f"{host}:0"
    )
    for worker in workers:
        spec[worker.name]["host"] = f"{host}:{worker.port}"
    topology.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return workers
