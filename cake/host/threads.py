"""How idle OpenMP threads wait (spin or sleep), chosen from the situation before torch loads.

torch's CPU kernels run on an OpenMP thread team. Between two parallel regions (two matrix
products of a decode step, say) the team's threads either spin, ready within a microsecond, or
sleep and must be woken by the kernel. On a process that has its cores to itself, spinning is
worth about a fifth of the decode speed (issue 11: 30.7 vs 24.7 tok/s). But a spinning team
never stops spinning (libgomp's OMP_WAIT_POLICY=ACTIVE), so where several stages share the cores
(workers on this host, the master beside them, the HTTP API's concurrent generations, each with
its own team) the idle ones burn the cores the busy one needs: decode ran 3x slower.

Spinning also loses badly where other programs keep the cores busy: a team waits at every
barrier for its slowest thread, and a descheduled thread makes the others spin out their time
slices (SmolLM2 decode 1.0 tok/s spinning vs 3.3 sleeping at a load average of 11 on 2 cores).

So `--thread-wait auto` sleeps when this process shares its cores with other stages or the
machine is already busy when it starts (other processes keeping at least half the cores it may
use busy, measured over 0.1 s with this process's own CPU time taken out), and spins when it has
them to itself; `spin` and `sleep` force the choice, and an OMP_WAIT_POLICY already in the
environment is kept under `auto`, and so is GOMP_SPINCOUNT (libgomp's own bounded spin: that
many spins, then sleep). libgomp reads these once, when torch
loads it, hence this module is torch-free and runs first. For the same reason it holds
`one_malloc_arena`, which a worker calls before any thread starts (see there).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cake.host.network import is_loopback, is_this_host

WAIT_CHOICES = ("auto", "spin", "sleep")


# Set on a worker (any non-empty value but 0/false/no) to say that other stages share its cores.
COLOCATED_ENV = "CAKE_COLOCATED"


_OMP_VALUE = {"spin": "ACTIVE", "sleep": "PASSIVE", "brief": None}  # brief: libgomp decides


BUSY_LOAD_PER_CORE = 0.5  # other processes' load this high per usable core: the machine is busy
LOAD_WINDOW_S = 0.1  # how long machine_load watches the other processes


@dataclass(frozen=True)
class WaitPolicy:
    wait: str  # "spin", "sleep", or "brief" (GOMP_SPINCOUNT set: libgomp's bounded spin)
    reason: str  # for the log: why this choice

    @property
    def omp_wait_policy(self) -> str | None:
        return _OMP_VALUE[self.wait]


def _truthy(value: str | None) -> bool:
    return bool(value) and value.strip().lower() not in ("0", "false", "no", "off")


def choose_wait_policy(
    option: str,
    *,
    mode: str,
    api: bool = False,
    colocated: bool = False,
    topology_hosts: Iterable[str] = (),
    own_host: str | None = None,
    env: Mapping[str, str] | None = None,
    load: tuple[float, int] | None = None,
) -> WaitPolicy:
    """spin or sleep for this process.

    option: --thread-wait (auto, spin or sleep); mode: "master" or "worker"; api: the HTTP API
    (concurrent generations in threads); colocated: the worker was told other stages share its
    cores (--colocated or CAKE_COLOCATED); topology_hosts: the workers' hosts in the topology,
    this worker's own included; own_host: the host a worker listens on; load: (cores other
    processes keep busy, usable cores), measured here when not given (machine_load).
    """
    env = os.environ if env is None else env
    if option not in WAIT_CHOICES:
        raise ValueError(f"--thread-wait {option!r}: use {', '.join(WAIT_CHOICES)}")
    if option != "auto":
        return WaitPolicy(option, f"--thread-wait {option}")
    preset = env.get("OMP_WAIT_POLICY", "").strip().upper()
    if preset in ("ACTIVE", "PASSIVE"):
        wait = "spin" if preset == "ACTIVE" else "sleep"
        return WaitPolicy(wait, f"OMP_WAIT_POLICY={preset} in the environment")
    if env.get("GOMP_SPINCOUNT", "").strip():
        return WaitPolicy(
            "brief",
            f"GOMP_SPINCOUNT={env['GOMP_SPINCOUNT'].strip()} in the environment: libgomp spins "
            "that long, then sleeps",
        )
    if colocated or _truthy(env.get(COLOCATED_ENV)):
        return WaitPolicy("sleep", "other stages share this host's cores (--colocated)")
    if api:
        return WaitPolicy("sleep", "the HTTP API runs concurrent generations in threads")
    hosts = list(topology_hosts)
    if mode == "worker":
        if own_host is not None and is_loopback(own_host):
            return WaitPolicy("sleep", f"listening on {own_host}: the master runs on this host")
        local = [h for h in hosts if is_this_host(h)]
        if len(local) > 1:  # this worker's own entry and at least one more
            return WaitPolicy("sleep", "the topology has other workers on this host")
    elif any(is_this_host(h) for h in hosts):
        return WaitPolicy("sleep", "the topology has workers on this host")
    load_average, cores = machine_load() if load is None else load
    if load_average >= BUSY_LOAD_PER_CORE * cores:
        return WaitPolicy(
            "sleep",
            f"the machine is busy (other processes keep {load_average:.1f} of {cores} cores busy)",
        )
    return WaitPolicy("spin", "no other stage on this host, and the machine is idle")


def machine_load(window_s: float = LOAD_WINDOW_S) -> tuple[float, int]:
    """(cores other processes keep busy now, cores this process may run on); (0, cores) where
    unknown.

    Measured over `window_s` from /proc/stat's busy time minus this process's own CPU time, not
    from the 1-minute load average: that average remembers the last minute, so a benchmark that
    starts cake right after another cake run saw its own previous run as someone else's load and
    slept where spinning was 6% faster.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    before = _busy_seconds()
    if before is None:
        return 0.0, cores
    own_before, started = _own_cpu_seconds(), time.monotonic()
    time.sleep(window_s)
    after = _busy_seconds()
    if after is None:
        return 0.0, cores
    elapsed = max(time.monotonic() - started, 1e-6)
    others = (after - before) - (_own_cpu_seconds() - own_before)
    return max(others / elapsed, 0.0), cores


def _busy_seconds() -> float | None:
    """CPU seconds all processes spent busy since boot (/proc/stat); None where unreadable."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def topology_hosts(path: str | None) -> list[str]:
    """The workers' hosts; none for a topology that does not load (its error comes later)."""
    if path is None:
        return []
    from cake.topology import TopologyError, load_topology

    try:
        return [node.host for node in load_topology(path).nodes]
    except (TopologyError, OSError):
        return []


def listening_host(address: str | None, topology: str | None, name: str | None) -> str | None:
    """The host a worker listens on: --address, else its topology entry's; None if unknown."""
    from cake.topology import TopologyError, load_topology, parse_address

    try:
        if address:
            return parse_address(address, "--address")[0]
        if topology and name:
            return load_topology(topology).node(name).host
    except (TopologyError, OSError):
        pass  # reported with its own message when the worker starts
    return None


def apply_wait_policy(policy: WaitPolicy) -> bool:
    """Export the choice for libgomp (and for the processes this one starts); False if too late.

    libgomp reads OMP_WAIT_POLICY once, when torch loads it: in a process that imported torch
    already (cake used as a library, the tests) the variable would change nothing here and only
    leak into child processes, so it is left alone.
    """
    if "torch" in sys.modules:
        return False
    if policy.omp_wait_policy is None:
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = policy.omp_wait_policy
    return True
