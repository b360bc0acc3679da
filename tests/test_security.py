"""Cluster key and TLS: who may use a worker, and that the traffic can be encrypted."""

from __future__ import annotations

import ast
import asyncio
import os
import struct
import subprocess
from pathlib import Path

import pytest
import yaml
from cluster import N_TOKENS, cluster, generate, workers_in_thread
from helpers import greedy_tokens, run_cli, until

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
    return greedy_tokens(tiny_llama, "hi", N_TOKENS)


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
    """cake-cli (in this process) with CAKE_CLUSTER_KEY set wrong: one error, no text."""
    with workers_in_thread(
        tiny_llama, tmp_path, {"w1": ["model.layers.0-3"]}, cluster_key=b"right"
    ) as (topology, _):
        result = run_cli(
            *("--model", str(tiny_llama), "--topology", str(topology), "--prompt", "hi"),
            *("-n", "4", "--device", "cpu"),
            env={"CAKE_CLUSTER_KEY": "wrong"},
        )
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "cluster key mismatch" in result.stderr


@pytest.mark.slow
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


@pytest.mark.slow
def test_tls_and_cluster_key_through_the_cli(tiny_llama: Path, tmp_path: Path) -> None:
    """Worker processes with --tls-cert/--tls-key and CAKE_CLUSTER_KEY, cake-cli as the master
    (in this process) with --tls-ca and the same key: the text is the local run's; without
    --tls-ca the master is refused with the hint."""
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
    key = {"CAKE_CLUSTER_KEY": "k3y"}
    try:
        remote = run_cli(*generate, "--topology", str(topology), "--tls-ca", str(cert), env=key)
        plain = run_cli(*generate, "--topology", str(topology), env=key)
    finally:
        for worker in workers:
            worker.stop()
    local = run_cli(*generate)
    assert remote.exit_code == 0, remote.stderr
    assert remote.stdout == local.stdout and remote.stdout.strip()
    assert "round trips/token: 2.00" in remote.stderr
    assert plain.exit_code == 1 and plain.stdout == ""
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
        await until(lambda: worker.unauthenticated == 2)
        third = await stranger(port)
        reply = await refusal(third)
        assert reply.code == "handshake_busy" and "try again" in reply.message
        for link in silent:
            await link.wait_closed()
        await until(lambda: worker.unauthenticated == 0)  # their handshakes end as they close
        assert await open_and_generate(tiny_llama, topology, cluster_key="k") == expected

    async def run() -> None:
        async with cluster(tiny_llama, tmp_path, LAYERS, cluster_key=b"k") as (topology, workers):
            await check(topology, workers)

    asyncio.run(run())


# Modules whose loading runs code from the data, and calls that do.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle"}
UNSAFE_NAMES = {
    "builtins.eval",
    "builtins.exec",
    "builtins.compile",
    "builtins.__import__",
    "torch.load",
    "torch.serialization.load",
    "torch.jit.load",
    "yaml.load",
    "yaml.load_all",
    "yaml.unsafe_load",
    "yaml.unsafe_load_all",
    "yaml.full_load",
    "yaml.full_load_all",
}
BUILTINS = {name.removeprefix("builtins.") for name in UNSAFE_NAMES if name.startswith("builtins.")}


def _dotted(node: ast.AST) -> str | None:
    """`a.b.c` for a chain of attributes on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _is_unsafe(qualified: str) -> bool:
    return qualified in UNSAFE_NAMES or qualified.split(".")[0] in UNSAFE_MODULES


def unsafe_uses(source: str) -> list[str]:
    """Where `source` imports an unsafe module or names an unsafe function, however it was
    imported: `import pickle as p; p.loads`, `from torch import load as l; l(...)`,
    `getattr(torch, "load")`, `importlib.import_module("pickle")`, `builtins.eval` ...

    Each name is resolved through the file's imports (at any depth) to the dotted name it
    stands for; a bare eval/exec/compile/__import__ is the builtin."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}  # a name bound by an import -> the dotted name it stands for
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:
                    aliases[alias.name.split(".")[0]] = alias.name.split(".")[0]
                if _is_unsafe(alias.name):
                    problems.append(f"{node.lineno}: imports {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                qualified = f"{node.module}.{alias.name}"
                aliases[alias.asname or alias.name] = qualified
                if _is_unsafe(qualified):
                    problems.append(f"{node.lineno}: imports {qualified}")

    def resolve(dotted: str) -> str:
        head, _, rest = dotted.partition(".")
        if head in aliases:
            head = aliases[head]
        elif head in BUILTINS:
            head = f"builtins.{head}"
        return f"{head}.{rest}" if rest else head

    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name | ast.Attribute) and id(node) not in inner:
            dotted = _dotted(node)
            if dotted is not None and _is_unsafe(resolve(dotted)):
                problems.append(f"{node.lineno}: uses {dotted} ({resolve(dotted)})")
        elif isinstance(node, ast.Call) and len(node.args) >= 2:
            # getattr(module, "name") names module.name
            func, (owner, name) = node.func, node.args[:2]
            if (
                isinstance(func, ast.Name)
                and func.id == "getattr"
                and isinstance(name, ast.Constant)
                and isinstance(name.value, str)
                and (dotted := _dotted(owner)) is not None
                and _is_unsafe(f"{resolve(dotted)}.{name.value}")
            ):
                problems.append(f"{node.lineno}: getattr {resolve(dotted)}.{name.value}")
        if isinstance(node, ast.Call) and node.args:
            # importlib.import_module("pickle") and __import__("pickle")
            dotted, first = _dotted(node.func), node.args[0]
            if (
                dotted is not None
                and resolve(dotted) in ("importlib.import_module", "builtins.__import__")
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
                and _is_unsafe(first.value)
            ):
                problems.append(f"{node.lineno}: imports {first.value} by name")
    return problems


@pytest.mark.parametrize(
    "source",
    [
        "import pickle\npickle.loads(b'')",
        "import pickle as p\np.loads(b'')",
        "from pickle import loads as l\nl(b'')",
        "from pickle import *",
        "import marshal as m",
        "import torch\ntorch.load('x')",
        "import torch as t\nt.load('x')",
        "from torch import load\nload('x')",
        "from torch import load as fetch\nfetch('x')",
        "import torch.serialization as s\ns.load('x')",
        "from torch.serialization import load as l\nl('x')",
        "import torch\nf = torch.load\nf('x')",
        "import torch\ngetattr(torch, 'load')('x')",
        "import torch.jit\ntorch.jit.load('x')",
        "import yaml as y\ny.load('x')",
        "from yaml import unsafe_load\nunsafe_load('x')",
        "eval('1')",
        "exec('x = 1')",
        "compile('1', 'f', 'eval')",
        "__import__('os')",
        "import builtins\nbuiltins.eval('1')",
        "import builtins as b\nb.exec('1')",
        "from builtins import eval as e\ne('1')",
        "import importlib\nimportlib.import_module('pickle')",
        "def f():\n    import pickle as p\n    return p.loads(b'')",
    ],
)
def test_the_unsafe_code_check_sees_through_aliases(source: str) -> None:
    assert unsafe_uses(source), f"not caught:\n{source}"


@pytest.mark.parametrize(
    "source",
    [
        "import torch\ntorch.save({}, 'x')\ntorch.compile(f)",
        "import re\nre.compile('x')",
        "import json\njson.loads('1')",
        "import yaml\nyaml.safe_load('x')",
        "from safetensors.torch import load_file\nload_file('x')",
        "model.eval()",
        "import torch as t\nt.nn.Module().eval()",
        "def load(x): ...\nload(1)",
    ],
)
def test_the_unsafe_code_check_passes_safe_code(source: str) -> None:
    assert unsafe_uses(source) == []


def test_no_code_deserialisation_in_the_package() -> None:
    """Nothing in cake may deserialise code: no pickle, torch.load, eval/exec, yaml.load, under
    any alias."""
    problems = [
        f"{path.relative_to(Path(cake.__file__).parent)}:{problem}"
        for path in sorted(Path(cake.__file__).parent.rglob("*.py"))
        for problem in unsafe_uses(path.read_text())
    ]
    assert problems == []
