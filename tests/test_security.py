"""Cluster key and TLS: who may use a worker, and that the traffic can be encrypted."""

from __future__ import annotations

import ast
import asyncio
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cluster import cluster, generate, local_tokens

import cake
from cake.cluster.local_cluster import start_local_cluster, start_workers
from cake.errors import WorkerError
from cake.master import Master, MasterSettings
from cake.model.config import LlamaConfig, architecture_of
from cake.wire import worker_connection
from cake.wire.auth import client_tls, new_nonce, proof, server_tls
from cake.wire.protocol import (
    HANDSHAKE_MAX_FRAME_BYTES,
    AuthChallenge,
    AuthProof,
    AuthResponse,
    ErrorMessage,
    Hello,
    Welcome,
    fingerprint_config,
    session_frame_limit,
)
from cake.wire.transport import Link, LinkError

LAYERS = {"w1": ["model.layers.0-1"], "w2": ["model.layers.2-3"]}


def with_cluster(folder: Path, tmp_path: Path, check, **worker_options: object) -> None:
    """Run `check(topology)` (a coroutine function) against in-process workers."""

    async def run() -> None:
        async with cluster(folder, tmp_path, LAYERS, **worker_options) as (topology, _):
            await check(topology)

    asyncio.run(run())


async def open_and_generate(folder: Path, topology: Path, **options: object) -> list[int]:
    master = await Master.open(
        MasterSettings(folder, topology, device="cpu", dtype="f32", **options)
    )
    try:
        return (await generate(master, "hi"))[0]
    finally:
        await master.close()


@pytest.fixture(scope="module")
def expected(tiny_llama: Path) -> list[int]:
    return asyncio.run(local_tokens(tiny_llama, "hi"))


@pytest.mark.parametrize(
    ("worker_key", "master_key", "error"),
    [
        ("s3cret", "s3cret", None),
        ("s3cret", "wrong", "cluster key mismatch"),
        ("s3cret", None, "requires the cluster key"),
        (None, "s3cret", "has no cluster key"),
        (None, None, None),
    ],
    ids=["right key", "wrong key", "no key on master", "key on master only", "no keys"],
)
def test_cluster_key_handshake(
    worker_key: str | None,
    master_key: str | None,
    error: str | None,
    tiny_llama: Path,
    expected: list[int],
    tmp_path: Path,
) -> None:
    async def check(topology: Path) -> None:
        if error is None:
            assert await open_and_generate(tiny_llama, topology, cluster_key=master_key) == (
                expected
            )
        else:
            with pytest.raises(WorkerError, match=error):
                await open_and_generate(tiny_llama, topology, cluster_key=master_key)

    key = worker_key.encode() if worker_key else None
    with_cluster(tiny_llama, tmp_path, check, cluster_key=key)


def test_wrong_key_from_the_cli_prints_no_text(tiny_llama: Path, tmp_path: Path) -> None:
    topology = tmp_path / "topology.yml"
    workers = start_local_cluster(
        tiny_llama,
        {"w1": ["model.layers.0-3"]},
        topology,
        extra=("--device", "cpu", "--cluster-key", "right"),
    )
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "cake.cli",
                "--model",
                str(tiny_llama),
                "--topology",
                str(topology),
                "--prompt",
                "hi",
                "-n",
                "4",
                "--device",
                "cpu",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "CAKE_CLUSTER_KEY": "wrong"},
        )
    finally:
        workers[0].stop()
    assert result.returncode != 0
    assert result.stdout == ""
    assert "cluster key mismatch" in result.stderr


def test_worker_on_a_public_address_without_key_warns(tiny_llama: Path, tmp_path: Path) -> None:
    topology = tmp_path / "topology.yml"
    topology.write_text(yaml.safe_dump({"w1": {"host": "0.0.0.0:1", "layers": ["model.layers.0"]}}))
    workers = start_workers(
        tiny_llama, topology, ["w1"], extra=("--device", "cpu", "--address", "0.0.0.0:0")
    )
    workers[0].stop()
    assert "without a cluster key" in workers[0].log


def make_certificate(folder: Path, name: str, san: str = "IP:127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for `san` (127.0.0.1 by default), made with openssl as the
    README shows."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=cake",
            "-addext",
            f"subjectAltName={san}",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_tls_trusted_certificate_works(
    tiny_llama: Path, expected: list[int], tmp_path: Path
) -> None:
    cert, key = make_certificate(tmp_path, "worker")

    async def check(topology: Path) -> None:
        assert await open_and_generate(tiny_llama, topology, tls_ca=str(cert)) == expected

    with_cluster(tiny_llama, tmp_path, check, tls=server_tls(str(cert), str(key)))


def test_tls_untrusted_certificate_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path, "worker")
    other, _ = make_certificate(tmp_path, "impostor")

    async def check(topology: Path) -> None:
        with pytest.raises(WorkerError, match=r"TLS handshake failed.*certificate"):
            await open_and_generate(tiny_llama, topology, tls_ca=str(other))
        with pytest.raises(WorkerError, match="pass --tls-ca"):
            await open_and_generate(tiny_llama, topology)  # plaintext to a TLS worker

    with_cluster(tiny_llama, tmp_path, check, tls=server_tls(str(cert), str(key)))


def test_tls_and_key_together(tiny_llama: Path, expected: list[int], tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path, "worker")

    async def check(topology: Path) -> None:
        tokens = await open_and_generate(tiny_llama, topology, tls_ca=str(cert), cluster_key="k")
        assert tokens == expected

    with_cluster(tiny_llama, tmp_path, check, tls=server_tls(str(cert), str(key)), cluster_key=b"k")


def test_tls_option_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="both --tls-cert and --tls-key"):
        server_tls(str(tmp_path / "a.crt"), None)
    with pytest.raises(ValueError, match="cannot load --tls-ca"):
        client_tls(str(tmp_path / "missing.crt"))


def test_tls_checks_the_host_name(tiny_llama: Path, expected: list[int], tmp_path: Path) -> None:
    """A trusted certificate for another name is refused: it names 'localhost', not 127.0.0.1."""
    cert, key = make_certificate(tmp_path, "localhost", san="DNS:localhost")

    async def check(topology: Path) -> None:
        with pytest.raises(WorkerError, match=r"TLS handshake failed.*(IP address mismatch|name)"):
            await open_and_generate(tiny_llama, topology, tls_ca=str(cert))
        by_name = tmp_path / "by-name.yml"
        by_name.write_text(topology.read_text().replace("127.0.0.1:", "localhost:"))
        assert await open_and_generate(tiny_llama, by_name, tls_ca=str(cert)) == expected

    with_cluster(tiny_llama, tmp_path, check, tls=server_tls(str(cert), str(key)))


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cake.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_tls_and_cluster_key_through_the_cli(tiny_llama: Path, tmp_path: Path) -> None:
    """Worker and master processes with --tls-cert/--tls-key/--tls-ca and CAKE_CLUSTER_KEY:
    the text is the local run's; without --tls-ca the master is refused with the hint."""
    cert, key = make_certificate(tmp_path, "worker")
    topology = tmp_path / "topology.yml"
    env = {**os.environ, "CAKE_CLUSTER_KEY": "k3y"}
    tls = ("--tls-cert", str(cert), "--tls-key", str(key))
    workers = start_local_cluster(
        tiny_llama,
        {"w1": ["model.layers.0-1"], "w2": ["model.layers.2-3"]},
        topology,
        extra=("--device", "cpu", *tls),
        env={**env, "PYTHONUNBUFFERED": "1"},
    )
    generate = ("--model", str(tiny_llama), "--prompt", "hi", "--temperature", "0", "-n", "8")
    generate += ("--ignore-eos", "--device", "cpu")
    try:
        remote = cli(*generate, "--topology", str(topology), "--tls-ca", str(cert), env=env)
        plain = cli(*generate, "--topology", str(topology), env=env)
    finally:
        for worker in workers:
            worker.stop()
    local = cli(*generate)
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout and remote.stdout.strip()
    assert "round trips/token: 2.00" in remote.stderr
    assert plain.returncode == 1 and plain.stdout == ""
    assert "pass --tls-ca" in plain.stderr


# --- Strangers: what a peer that has not proved the key can do -------------------------------


async def stranger(port: int) -> Link:
    """A raw connection to a worker, as anyone who reaches its port has."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return Link(reader, writer, "worker", max_frame_bytes=1 << 20)


def port_of(topology: Path, name: str = "w1") -> int:
    return int(yaml.safe_load(topology.read_text())[name]["host"].rsplit(":", 1)[1])


async def refusal(link: Link) -> ErrorMessage:
    """The worker's one error reply, after which it has closed the connection."""
    reply = await link.recv(timeout=10)
    assert isinstance(reply, ErrorMessage), reply
    with pytest.raises(LinkError, match="closed"):
        await link.recv(timeout=10)
    await link.wait_closed()
    return reply


async def answer_challenge(link: Link) -> AuthResponse:
    master_nonce = new_nonce()
    await link.send(AuthChallenge(nonce=master_nonce))
    response = await link.recv(timeout=10)
    assert isinstance(response, AuthResponse)
    link.master_nonce = master_nonce  # type: ignore[attr-defined]
    return response


@pytest.mark.parametrize("forgery", ["random", "wrong key", "replayed", "worker's own"])
def test_worker_refuses_a_forged_proof_from_a_stranger(
    forgery: str, tiny_llama: Path, tmp_path: Path
) -> None:
    async def check(topology: Path) -> None:
        port = port_of(topology)
        # A real master's exchange, seen on the wire by an eavesdropper.
        seen = await stranger(port)
        seen_response = await answer_challenge(seen)
        seen_proof = proof(b"s3cret", "master", seen.master_nonce, seen_response.nonce)
        await seen.wait_closed()

        link = await stranger(port)
        if forgery == "replayed":  # same challenge as the master's, its proof sent again
            await link.send(AuthChallenge(nonce=seen.master_nonce))
            response = await link.recv(timeout=10)
            assert isinstance(response, AuthResponse)
            assert response.nonce != seen_response.nonce  # fresh: the old proof cannot fit
            forged = seen_proof
        else:
            response = await answer_challenge(link)
            forged = {
                "random": os.urandom(32),
                "wrong key": proof(b"guess", "master", link.master_nonce, response.nonce),
                "worker's own": response.proof,  # reflected back: the role tag stops it
            }[forgery]
        await link.send(AuthProof(proof=forged))
        reply = await refusal(link)
        assert (reply.code, reply.message) == (
            "auth_failed",
            "cluster key mismatch: the master's key is not worker w1's",
        )

    with_cluster(tiny_llama, tmp_path, check, cluster_key=b"s3cret")


def test_stranger_skipping_auth_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    async def check(topology: Path) -> None:
        link = await stranger(port_of(topology))
        await link.send(Hello(fingerprint="x" * 16, master="stranger"))
        assert (await refusal(link)).code == "auth_required"

    with_cluster(tiny_llama, tmp_path, check, cluster_key=b"s3cret")


@pytest.mark.parametrize("key", [b"s3cret", None], ids=["before auth", "before hello"])
def test_a_big_frame_before_the_handshake_is_cut_off(
    key: bytes | None, tiny_llama: Path, expected: list[int], tmp_path: Path
) -> None:
    """A 1 MB frame from a stranger: refused at its length prefix, nothing buffered."""

    async def check(topology: Path) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(topology))
        writer.write(struct.pack(">I", 1 << 20) + b"\0" * 1024)  # the rest never needs to come
        await writer.drain()
        link = Link(reader, writer, "worker")
        reply = await refusal(link)
        assert reply.code == "bad_message"
        assert f"exceeds the limit of {HANDSHAKE_MAX_FRAME_BYTES} bytes" in reply.message
        # The worker serves on, and after the handshake far larger frames are fine.
        tokens = await open_and_generate(
            tiny_llama, topology, cluster_key=key.decode() if key else None
        )
        assert tokens == expected

    with_cluster(tiny_llama, tmp_path, check, cluster_key=key)


def test_after_hello_the_frame_limit_is_the_sessions_largest(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """A full context of f32 hidden states (512 x 64 here) plus an envelope; not 512 MiB."""
    limit = session_frame_limit(hidden_size=64, max_positions=512)  # tests/cluster.py's context
    fingerprint = fingerprint_config(architecture_of(LlamaConfig.from_folder(tiny_llama)))

    async def check(topology: Path) -> None:
        link = await stranger(port_of(topology))
        await link.send(Hello(fingerprint=fingerprint, master="m"))
        assert isinstance(await link.recv(timeout=10), Welcome)
        link.writer.write(struct.pack(">I", limit + 1) + b"\0" * 1024)
        reply = await refusal(link)
        assert f"exceeds the limit of {limit} bytes" in reply.message

    with_cluster(tiny_llama, tmp_path, check)


def test_too_many_unauthenticated_connections_are_refused(
    tiny_llama: Path, expected: list[int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_connection, "MAX_UNAUTHENTICATED", 2)

    async def check(topology: Path, workers: dict) -> None:
        port, worker = port_of(topology), workers["w1"]
        silent = [await stranger(port), await stranger(port)]  # connect, say nothing
        for _ in range(500):
            if worker.unauthenticated == 2:
                break
            await asyncio.sleep(0.01)
        assert worker.unauthenticated == 2
        third = await stranger(port)
        reply = await refusal(third)
        assert reply.code == "handshake_busy" and "try again" in reply.message
        for link in silent:
            await link.wait_closed()
        for _ in range(500):  # their handshakes end as they close
            if worker.unauthenticated == 0:
                break
            await asyncio.sleep(0.01)
        assert await open_and_generate(tiny_llama, topology, cluster_key="k") == expected

    async def run() -> None:
        async with cluster(tiny_llama, tmp_path, LAYERS, cluster_key=b"k") as (topology, workers):
            await check(topology, workers)

    asyncio.run(run())


UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}
UNSAFE_MODULES = {"pickle", "cPickle", "marshal", "shelve", "dill"}


def test_no_code_deserialisation_in_the_package() -> None:
    """Nothing in cake may deserialise code: no pickle, torch.load, eval/exec, yaml.load."""
    problems = []
    for path in Path(cake.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in UNSAFE_MODULES for n in names):
                    problems.append(f"{where} imports {names}")
            elif isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Name) and func.id in UNSAFE_CALLS:
                    problems.append(f"{where} calls {func.id}")
                if isinstance(func, ast.Attribute):
                    owner = func.value.id if isinstance(func.value, ast.Name) else ""
                    if (owner, func.attr) in {
                        ("torch", "load"),
                        ("yaml", "load"),
                        ("yaml", "unsafe_load"),
                        ("yaml", "full_load"),
                    }:
                        problems.append(f"{where} calls {owner}.{func.attr}")
    assert problems == []
