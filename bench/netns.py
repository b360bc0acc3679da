"""`--netns`: workers in network namespaces behind veth links with netem delay (root only).

Each worker gets its own namespace `cakebench-<pid>-<i>`, joined to the root namespace (where
the master runs, in this process) by a veth pair on a private /30 (10.N.i.1 here, 10.N.i.2
there, with N chosen so that no address or route on this machine uses 10.N.0.0/16). netem on
both ends of each pair adds half the round-trip time each way and caps the rate (1 ms RTT and
1 gbit by default). Traffic only crosses links this module creates; it deletes them, and stops
the workers inside, on the way out (finally, and atexit as a backstop; bench.bench turns SIGINT
and SIGTERM into KeyboardInterrupt so both reach them).

Each worker count (1, 2, 3) runs twice, alternating: with one round trip per worker per step
(cake's batching of contiguous blocks) and with one round trip per block
(`Master.open(..., round_trip_per_block=True)`), so what batching saves is visible.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.cluster import write_topology
from bench.models import ModelSpec
from bench.runs import CakeRunner, alternate, warm_up
from bench.stats import ratios, spread
from bench.throughput import RunSettings, random_prompt
from cake.cluster.local_cluster import WorkerProcess, worker_command
from cake.master import Master, MasterSettings

log = logging.getLogger("bench")

PREFIX = "cakebench"
WORKER_PORT = 10128  # each worker has a namespace of its own, so they all use the same port
MAX_WORKERS = 3
BATCHED, PER_BLOCK = "one trip per worker", "one trip per block"


class Skipped(Exception):
    """The netns benchmark cannot run here; the message says why and what would fix it."""


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def preflight(rtt_ms: float) -> None:
    """Root, `ip` and `tc` (installing iproute2 if missing), and netem when a delay is asked."""
    if os.geteuid() != 0:
        raise Skipped("--netns needs root (it creates network namespaces and veth links)")
    if not (shutil.which("ip") and shutil.which("tc")) and shutil.which("apt-get"):
        log.info("netns: `ip`/`tc` missing; installing iproute2 with apt-get")
        run("apt-get", "install", "-y", "--no-install-recommends", "iproute2", check=False)
    if not (shutil.which("ip") and shutil.which("tc")):
        raise Skipped("--netns needs `ip` and `tc` (iproute2); install iproute2")
    if rtt_ms > 0:
        _probe_netem()


def _probe_netem() -> None:
    link = f"cb{os.getpid()}p"
    run("ip", "link", "add", link, "type", "veth", "peer", "name", link + "q")
    try:
        probe = run("tc", "qdisc", "add", "dev", link, "root", "netem", "delay", "1ms", check=False)
    finally:
        run("ip", "link", "del", link, check=False)
    if probe.returncode != 0:
        raise Skipped(
            "this kernel has no netem queueing discipline (sch_netem): `tc qdisc add ... netem` "
            f"says {probe.stderr.strip()!r}, so no delay can be added. Use a kernel with "
            "CONFIG_NET_SCH_NETEM (or `modprobe sch_netem`), or pass --netns-rtt-ms 0 to "
            "compare over plain veth links"
        )


def _free_second_octet() -> int:
    """N such that nothing on this machine uses 10.N.x.x, so our /30s route nowhere else."""
    used = run("ip", "-4", "-o", "addr", "show").stdout + run("ip", "-4", "route", "show").stdout
    for octet in range(213, 255):
        if not re.search(rf"\b10\.{octet}\.", used):
            return octet
    raise Skipped("no free 10.N.0.0/16 for the namespaces' links (213..254 all in use)")


class Lab:
    """The namespaces, veth links and worker processes of one run; cleanup() undoes them all."""

    def __init__(self, n: int, rtt_ms: float, rate: str) -> None:
        self.n = n
        self.rtt_ms = rtt_ms
        self.rate = rate
        self.octet = _free_second_octet()
        self.namespaces: list[str] = []
        self.host_links: list[str] = []
        self.workers: list[WorkerProcess] = []

    def namespace(self, i: int) -> str:
        return f"{PREFIX}-{os.getpid()}-{i}"

    def worker_address(self, i: int) -> str:
        return f"10.{self.octet}.{i}.2"

    def create(self) -> None:
        pid = os.getpid()
        for i in range(self.n):
            ns, host_link, ns_link = self.namespace(i), f"cb{pid}h{i}", f"cb{pid}n{i}"
            run("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            run("ip", "link", "add", host_link, "type", "veth", "peer", "name", ns_link)
            self.host_links.append(host_link)
            run("ip", "link", "set", ns_link, "netns", ns)
            run("ip", "addr", "add", f"10.{self.octet}.{i}.1/30", "dev", host_link)
            run("ip", "link", "set", host_link, "up")
            run("ip", "-n", ns, "addr", "add", f"{self.worker_address(i)}/30", "dev", ns_link)
            run("ip", "-n", ns, "link", "set", ns_link, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
            if self.rtt_ms > 0:
                netem = ["netem", "delay", f"{self.rtt_ms / 2:g}ms", "rate", self.rate]
                run("tc", "qdisc", "add", "dev", host_link, "root", *netem)
                run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", ns_link, "root", *netem)
        log.info(
            "netns: %d namespaces, veth links 10.%d.i.1 <-> 10.%d.i.2, %s",
            self.n,
            self.octet,
            self.octet,
            f"netem {self.rtt_ms:g} ms RTT, {self.rate}" if self.rtt_ms > 0 else "no delay",
        )

    def start_workers(
        self, spec: ModelSpec, topology: Path, names: Sequence[str], extra: Sequence[str]
    ) -> list[WorkerProcess]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        started = []
        for i, name in enumerate(names):
            address = f"{self.worker_address(i)}:{WORKER_PORT}"
            command = worker_command(spec.folder, name, topology, address, extra)
            worker = WorkerProcess(name, ["ip", "netns", "exec", self.namespace(i), *command], env)
            self.workers.append(worker)
            started.append(worker)
        for worker in started:
            worker.wait_ready()
        return started

    def stop_workers(self) -> None:
        while self.workers:
            self.workers.pop().stop()

    def cleanup(self) -> None:
        """Idempotent: stop our workers, delete our namespaces and links."""
        self.stop_workers()
        while self.namespaces:
            run("ip", "netns", "del", self.namespaces.pop(), check=False)
        while self.host_links:  # gone with their peers already, unless a step failed between
            run("ip", "link", "del", self.host_links.pop(), check=False)


async def measure_netns(
    spec: ModelSpec, settings: RunSettings, rtt_ms: float, rate: str = "1gbit"
) -> dict:
    """Decode tok/s for 1..3 namespaced workers, batched vs one round trip per block."""
    result = {"model": spec.title, "rtt_ms": rtt_ms, "rate": rate if rtt_ms > 0 else None}
    try:
        preflight(rtt_ms)
    except Skipped as exc:
        log.warning("netns: skipped: %s", exc)
        return {**result, "skipped": str(exc)}
    lab = Lab(MAX_WORKERS, rtt_ms, rate)
    atexit.register(lab.cleanup)  # in case the finally below never runs
    try:
        lab.create()
        prompt = random_prompt(spec, settings)
        rows = [
            await _measure_workers(spec, settings, lab, n, prompt)
            for n in range(1, MAX_WORKERS + 1)
        ]
    finally:
        lab.cleanup()
        atexit.unregister(lab.cleanup)
    return {**result, "rows": rows}


async def _measure_workers(
    spec: ModelSpec, settings: RunSettings, lab: Lab, n_workers: int, prompt: list[int]
) -> dict:
    with tempfile.TemporaryDirectory(prefix="cake-bench-netns-") as folder:
        topology = Path(folder) / "topology.yml"
        hosts = [f"{lab.worker_address(i)}:{WORKER_PORT}" for i in range(n_workers)]
        split = write_topology(topology, spec.config["num_hidden_layers"], hosts)
        extra = ("--device", "cpu", "--dtype", spec.dtype, "--max-seq-len")
        extra += (str(settings.max_seq_len),)
        log.info("netns: starting %d worker(s) in namespaces", n_workers)
        lab.start_workers(spec, topology, list(split), extra)
        runners: list[CakeRunner] = []
        try:
            for label, per_block in ((BATCHED, False), (PER_BLOCK, True)):
                master = await Master.open(
                    MasterSettings(
                        spec.folder,
                        topology=topology,
                        device="cpu",
                        dtype=spec.dtype,
                        max_seq_len=settings.max_seq_len,
                        round_trip_per_block=per_block,
                    ),
                )
                runners.append(CakeRunner(label, master))
            await warm_up(runners, prompt)
            measured = await alternate(runners, prompt, settings.tokens, settings.rounds)
        finally:
            for runner in runners:
                with contextlib.suppress(Exception):
                    await runner.close()
            lab.stop_workers()
    batched, per_block = measured[BATCHED], measured[PER_BLOCK]
    return {
        "workers": n_workers,
        "batched_decode_tok_s": spread([m.decode_tok_s for m in batched]),
        "per_block_decode_tok_s": spread([m.decode_tok_s for m in per_block]),
        "batched_vs_per_block": ratios(
            [m.decode_tok_s for m in batched], [m.decode_tok_s for m in per_block]
        ),
        "batched_round_trips_per_token": batched[-1].round_trips_per_token,
        "per_block_round_trips_per_token": per_block[-1].round_trips_per_token,
        "batched_wire_ms_per_token": spread([m.wire_ms_per_token for m in batched]),
        "per_block_wire_ms_per_token": spread([m.wire_ms_per_token for m in per_block]),
    }
