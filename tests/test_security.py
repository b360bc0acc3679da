"""Cluster key and TLS: who may use a worker, and that the traffic can be encrypted."""

from __future__ import annotations

import ast
import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cluster import cluster, generate, local_tokens

import cake
from cake.auth import client_tls, server_tls
from cake.errors import WorkerError
from cake.local_cluster import start_local_cluster, start_workers
from cake.master import Master

LAYERS = {"w1": ["model.layers.0-1"], "w2": ["model.layers.2-3"]}


def with_cluster(folder: Path, tmp_path: Path, check, **worker_options: object) -> None:
    """Run `check(topology)` (a coroutine function) against in-process workers."""

    async def run() -> None:
        async with cluster(folder, tmp_path, LAYERS, **worker_options) as (topology, _):
            await check(topology)

    asyncio.run(run())


async def open_and_generate(folder: Path, topology: Path, **options: object) -> list[int]:
    master = await Master.open(folder, topology, device="cpu", dtype="f32", **options)
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


def make_certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with openssl as the README shows."""
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
            "subjectAltName=IP:127.0.0.1",
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
