"""The thread-waiting policy: spin alone, sleep beside other stages, the option overrides.

The machine's load is pinned in every test (idle unless a test says otherwise), so that no
result depends on how busy the machine running the tests is: a rule that wrongly fell through
to the load would otherwise pass whenever the machine happened to be busy."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from cake.host import threads
from cake.host.network import is_this_host
from cake.host.threads import choose_wait_policy

ELSEWHERE = "192.0.2.7"  # TEST-NET-1: documentation only, never an address of this machine
CLEAN: dict[str, str] = {}  # an environment without OMP_WAIT_POLICY or CAKE_COLOCATED
IDLE = (0.1, 2)  # (cores other processes keep busy, cores): nothing else running
BUSY = (3.0, 2)
MEASURE_LOAD = threads.machine_load  # the real one (idle_machine stands in for it)


@pytest.fixture(autouse=True)
def idle_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a test passes no load, the policy measures it: it finds an idle machine."""
    monkeypatch.setattr(threads, "machine_load", lambda: IDLE)


def test_explicit_option_wins_over_everything() -> None:
    env = {"OMP_WAIT_POLICY": "PASSIVE", "CAKE_COLOCATED": "1"}
    spin = choose_wait_policy("spin", mode="worker", colocated=True, own_host="127.0.0.1", env=env)
    assert (spin.wait, spin.omp_wait_policy) == ("spin", "ACTIVE")
    sleep = choose_wait_policy("sleep", mode="master", env=CLEAN)
    assert (sleep.wait, sleep.omp_wait_policy) == ("sleep", "PASSIVE")


def test_auto_keeps_a_preset_environment_variable() -> None:
    policy = choose_wait_policy("auto", mode="master", env={"OMP_WAIT_POLICY": "active"})
    assert policy.wait == "spin"
    assert "OMP_WAIT_POLICY" in policy.reason


def test_auto_keeps_a_bounded_libgomp_spin() -> None:
    policy = choose_wait_policy(
        "auto", mode="worker", own_host="127.0.0.1", env={"GOMP_SPINCOUNT": "20000"}
    )
    assert (policy.wait, policy.omp_wait_policy) == ("brief", None)
    assert "GOMP_SPINCOUNT=20000" in policy.reason


def test_local_master_spins() -> None:
    assert choose_wait_policy("auto", mode="master", env=CLEAN, load=IDLE).wait == "spin"


def test_a_busy_machine_sleeps() -> None:
    policy = choose_wait_policy("auto", mode="master", env=CLEAN, load=BUSY)
    assert policy.wait == "sleep"
    assert "other processes keep 3.0 of 2 cores busy" in policy.reason


def test_the_load_measured_leaves_out_this_process_own_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A process that spins through the whole window sees no load but its own: none. (The
    1-minute load average would count the busy minute before it, its own included.)"""
    busy_seconds = iter([100.0, 100.2])  # the machine: 0.2 CPU-seconds busy in the window
    own_seconds = iter([5.0, 5.2])  # ... all of them this process's own
    monkeypatch.setattr(threads, "_busy_seconds", lambda: next(busy_seconds))
    monkeypatch.setattr(threads, "_own_cpu_seconds", lambda: next(own_seconds))
    others, _ = MEASURE_LOAD(window_s=0.01)
    assert others < 1e-9
    busy_seconds = iter([100.0, 100.5])  # now someone else burnt 0.3 CPU-seconds in ~0.01 s
    own_seconds = iter([5.0, 5.2])
    others, _ = MEASURE_LOAD(window_s=0.01)
    assert others > 1.0


def test_the_load_is_measured_from_proc_stat() -> None:
    others, cores = MEASURE_LOAD(window_s=0.05)
    assert cores >= 1 and 0.0 <= others <= 64


def test_master_with_remote_workers_spins() -> None:
    policy = choose_wait_policy(
        "auto", mode="master", topology_hosts=[ELSEWHERE], env=CLEAN, load=IDLE
    )
    assert policy.wait == "spin"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_master_with_a_worker_on_this_host_sleeps(host: str) -> None:
    hosts = [ELSEWHERE, host]
    assert choose_wait_policy("auto", mode="master", topology_hosts=hosts, env=CLEAN).wait == (
        "sleep"
    )


def test_api_server_sleeps() -> None:
    assert choose_wait_policy("auto", mode="master", api=True, env=CLEAN).wait == "sleep"


def test_worker_alone_on_its_machine_spins() -> None:
    policy = choose_wait_policy(
        "auto", mode="worker", topology_hosts=[ELSEWHERE], own_host="0.0.0.0", env=CLEAN, load=IDLE
    )
    assert policy.wait == "spin"


def test_worker_on_loopback_sleeps() -> None:
    policy = choose_wait_policy(
        "auto", mode="worker", topology_hosts=["127.0.0.1"], own_host="127.0.0.1", env=CLEAN
    )
    assert policy.wait == "sleep"


def test_worker_sharing_its_host_with_another_worker_sleeps() -> None:
    here = socket.gethostname()
    shared = choose_wait_policy(
        "auto", mode="worker", topology_hosts=[here, here], own_host="0.0.0.0", env=CLEAN
    )
    assert shared.wait == "sleep"
    alone = choose_wait_policy(
        "auto",
        mode="worker",
        topology_hosts=[here, ELSEWHERE],
        own_host="0.0.0.0",
        env=CLEAN,
        load=IDLE,
    )
    assert alone.wait == "spin"


@pytest.mark.parametrize("value", ["1", "yes", "true"])
def test_colocated_worker_sleeps(value: str) -> None:
    by_env = choose_wait_policy("auto", mode="worker", env={"CAKE_COLOCATED": value})
    assert by_env.wait == "sleep"
    assert choose_wait_policy("auto", mode="worker", colocated=True, env=CLEAN).wait == "sleep"
    alone = choose_wait_policy("auto", mode="worker", env={"CAKE_COLOCATED": "0"}, load=IDLE)
    assert alone.wait == "spin"


def test_this_host() -> None:
    assert is_this_host("127.0.0.1")
    assert is_this_host(socket.gethostname())
    assert not is_this_host(ELSEWHERE)
    assert not is_this_host("no-such-host.invalid")


def test_bad_option() -> None:
    with pytest.raises(ValueError, match="--thread-wait"):
        choose_wait_policy("busy", mode="master", env=CLEAN)


# The CLI in a process of its own (it must choose before torch loads, and this one has torch):
# the real click entry point parses the arguments, then stops and reports right after choosing,
# with the machine's load pinned as given.
CLI_POLICY = """
import json, os, sys
from cake import cli
from cake.host import threads

threads.machine_load = lambda: tuple(json.loads(os.environ["TEST_LOAD"]))
choose = cli._setup_threads

def choose_then_report(opts):
    choose(opts)
    print(os.environ.get("OMP_WAIT_POLICY"), "torch" in sys.modules)
    sys.exit(0)

cli._setup_threads = choose_then_report
cli.main(sys.argv[1:], prog_name="cake-cli")
"""


@pytest.mark.parametrize(
    ("args", "load", "expected"),
    [
        ([], IDLE, "ACTIVE"),  # a master alone on an idle machine spins
        ([], BUSY, "PASSIVE"),  # ... and sleeps on a busy one
        (["--thread-wait", "spin"], BUSY, "ACTIVE"),
        (["--thread-wait", "sleep"], IDLE, "PASSIVE"),
        (["--topology", "{topology}"], IDLE, "PASSIVE"),  # a worker on this host
        (["--api", "127.0.0.1:0"], IDLE, "PASSIVE"),
        (["--workers", "127.0.0.1:5000"], IDLE, "PASSIVE"),
        (["--workers", "192.0.2.7:5000"], IDLE, "ACTIVE"),
        (["--mode", "worker", "--address", "127.0.0.1:5000"], IDLE, "PASSIVE"),
        (["--mode", "worker", "--address", "0.0.0.0:5000"], IDLE, "ACTIVE"),
        (["--mode", "worker", "--address", "0.0.0.0:5000", "--colocated"], IDLE, "PASSIVE"),
        (["--mode", "worker", "--address", "0.0.0.0:5000"], BUSY, "PASSIVE"),
        (
            ["--mode", "worker", "--address", "0.0.0.0:5000", "--thread-wait", "spin"],
            BUSY,
            "ACTIVE",
        ),
    ],
    ids=[
        "master alone, idle",
        "master alone, busy",
        "spin forced, busy",
        "sleep forced, idle",
        "worker on this host",
        "api",
        "--workers on this host",
        "--workers elsewhere",
        "worker on loopback",
        "worker alone, idle",
        "worker colocated",
        "worker alone, busy",
        "worker spin forced, busy",
    ],
)
def test_cli_sets_the_policy_before_torch_loads(
    tmp_path, args: list[str], load: tuple[float, int], expected: str
) -> None:
    """cake-cli exports its choice before anything imports torch (libgomp reads it then)."""
    topology = tmp_path / "topology.yml"
    topology.write_text("w1:\n  host: '127.0.0.1:1'\n  layers: ['model.layers.0']\n")
    args = [a.format(topology=topology) for a in args]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path), "TEST_LOAD": str(list(load))}
    out = subprocess.run(
        [sys.executable, "-c", CLI_POLICY, "--model", str(tmp_path), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [expected, "False"], out.stderr
