"""Command-line errors of the empty-worker flow: one clear line each, nothing on stdout."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from test_cli import assert_fails, run_cli


def test_empty_worker_needs_a_key_and_an_address() -> None:
    assert_fails(
        run_cli("--mode", "worker", "--address", "127.0.0.1:0"), "needs --cluster-key", exit_code=1
    )
    assert_fails(run_cli("--mode", "worker", "--cluster-key", "k"), "needs --address", exit_code=1)


def test_master_needs_a_model() -> None:
    assert_fails(run_cli("--workers", "127.0.0.1:1", "--cluster-key", "k"), "--model is required")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--plan"], "--plan needs --workers or --discover"),
        (["--workers", "127.0.0.1:1"], "need --cluster-key"),
        (["--workers", "127.0.0.1:1", "--cluster-key", "k", "--topology", "t.yml"], "not both"),
        (["--workers", "no-port", "--cluster-key", "k"], "missing ':port'"),
    ],
)
def test_bad_cluster_options(tiny_llama: Path, args: list[str], needle: str) -> None:
    assert_fails(run_cli("--model", str(tiny_llama), *args), needle, exit_code=1)


def test_bad_max_memory() -> None:
    result = run_cli("--mode", "worker", "--cluster-key", "k", "--max-memory", "lots")
    assert_fails(result, "give a size such as 2GiB", exit_code=2)


def test_unreachable_worker_is_named(tiny_llama: Path) -> None:
    with socket.socket() as held:  # bound but not listening, for the whole run: refused
        held.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{held.getsockname()[1]}"
        result = run_cli(
            "--model", str(tiny_llama), "--workers", address, "--cluster-key", "k",
            "--connect-timeout", "2",
        )  # fmt: skip
    assert_fails(result, address, "is an empty worker running there?", exit_code=1)
