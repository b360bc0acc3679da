"""Empty workers on loopback: measured plan, tensor push, cache reuse, resume, wrong key."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
from cluster import GREEDY
from helpers import encode, greedy_tokens, reference_tokens, run_cli, wait_until

from cake.cluster.local_cluster import WorkerProcess
from cake.cluster.measure import block_bytes
from cake.cluster.payload import ModelManifest, Payload
from cake.cluster.push import ModelCache
from cake.cluster.setup import ClusterOptions, prepare_cluster
from cake.errors import WorkerError
from cake.master import Master, MasterSettings
from cake.model.config import LlamaConfig
from cake.topology import parse_topology
from cake.wire.protocol import ErrorMessage, PushOffer
from cake.wire.transport import LinkError, open_link

KEY = "test-cluster-key"
SEQ_LEN = 256
N_TOKENS = 10


def empty_worker(
    name: str,
    cache: Path,
    port: int = 0,
    key: str = KEY,
    max_memory: int | None = None,
    wait: bool = True,
    extra: tuple[str, ...] = (),
) -> WorkerProcess:
    args = [
        sys.executable,
        "-m",
        "cake.cli",
        "--mode",
        "worker",
        "--cluster-key",
        key,
        "--address",
        f"127.0.0.1:{port}",
        "--cache-dir",
        str(cache),
        "--device",
        "cpu",
        "--discovery-port",
        "0",
    ]
    if max_memory is not None:
        args += ["--max-memory", str(max_memory)]
    args += list(extra)
    worker = WorkerProcess(name, args, {**os.environ, "PYTHONUNBUFFERED": "1"})
    if wait:
        worker.wait_ready()
    return worker


def options(ports: list[int], **overrides: object) -> ClusterOptions:
    settings: dict = {
        "workers": [f"127.0.0.1:{port}" for port in ports],
        "cluster_key": KEY.encode(),
        "device": "cpu",
        "dtype": "f32",
        "max_seq_len": SEQ_LEN,
        "master_blocks": 0,
        "retry_timeout": 0,
    }
    return ClusterOptions(**{**settings, **overrides})


def cached_tensors(cache: Path) -> set[str]:
    """Tensor names complete in a worker's cache, over every model folder in it."""
    names: set[str] = set()
    for index in cache.glob("*/model.safetensors.index.json"):
        names |= set(json.loads(index.read_text())["weight_map"])
    return names


def block_names(blocks: range) -> set[str]:
    suffixes = [
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ]
    return {f"model.layers.{i}.{suffix}" for i in blocks for suffix in suffixes}


def _greedy(folder: Path, topology: object, prompt: str, **settings: object) -> list[int]:
    """Greedy tokens over the planned cluster (or, topology None, of the master alone)."""
    if topology is not None:
        settings["cluster_key"] = KEY
    return greedy_tokens(folder, prompt, N_TOKENS, topology, max_seq_len=SEQ_LEN, **settings)


@pytest.mark.slow
def test_two_empty_workers_plan_push_generate_and_reuse(tiny_llama: Path, tmp_path: Path) -> None:
    config = LlamaConfig.from_folder(tiny_llama)
    # Room for two blocks each (and not three): the plan must split 2 + 2.
    room = int(2.5 * block_bytes(config, __import__("torch").float32, SEQ_LEN))
    caches = [tmp_path / "cache1", tmp_path / "cache2"]
    workers = [empty_worker(f"w{i}", cache, max_memory=room) for i, cache in enumerate(caches)]
    try:
        ports = [worker.port for worker in workers]
        assert all(ports)
        plan = asyncio.run(prepare_cluster(str(tiny_llama), options(ports)))
        ranges = {node.port: node.blocks for node in plan.topology.nodes}
        assert sorted(ranges.values()) == [(0, 1), (2, 3)]
        assert all(stats.bytes_sent > 0 for stats in plan.pushed.values())
        tokens = _greedy(tiny_llama, plan.topology, "hi")
        assert tokens == reference_tokens(tiny_llama, encode(tiny_llama, "hi"), N_TOKENS)
        # Each cache holds exactly its worker's blocks: no embedding, head or other blocks.
        for port, cache in zip(ports, caches, strict=True):
            assert cached_tensors(cache) == block_names(range(*_span(ranges[port])))
        # The next run finds everything in place: nothing is pushed.
        again = asyncio.run(prepare_cluster(str(tiny_llama), options(ports)))
        assert {n.port: n.blocks for n in again.topology.nodes} == ranges
        assert [stats.bytes_sent for stats in again.pushed.values()] == [0, 0]
        assert all(stats.items_cached > 0 for stats in again.pushed.values())
        tokens_again = _greedy(tiny_llama, again.topology, "hi")
        assert tokens_again == tokens
        # --plan (cake-cli in this process) prints the plan as a topology.yml, alone on stdout.
        printed = run_cli(
            "--model", str(tiny_llama), "--workers", ",".join(f"127.0.0.1:{p}" for p in ports),
            "--cluster-key", KEY, "--plan", "--master-blocks", "0", "--device", "cpu",
            "--max-seq-len", str(SEQ_LEN),
        )  # fmt: skip
        assert printed.exit_code == 0, printed.stderr
        pinned = parse_topology(printed.stdout)
        assert {node.port: node.blocks for node in pinned.nodes} == ranges
        assert "predicted decode" in printed.stdout  # in a comment on top
    finally:
        for worker in workers:
            worker.stop()


@pytest.mark.slow
def test_quantized_and_gguf_models_push_what_the_worker_runs(
    tiny_llama: Path, smollm2_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--quantize int4 pushes int4 tensors, a GGUF pushes its decoded int4 blocks; either way
    the cluster's greedy text is the one the master alone produces from the same model (read
    as the push reads it: decoded, not run from the file's mapped blocks, whose f16 scales the
    int4 form rounds to bf16)."""
    monkeypatch.setenv("CAKE_NO_MMAP", "1")
    cache = tmp_path / "cache"
    worker = empty_worker("w", cache)
    try:
        plan = asyncio.run(
            prepare_cluster(str(tiny_llama), options([worker.port], dtype="auto", quantize="int4"))
        )
        assert [node.blocks for node in plan.topology.nodes] == [(0, 1, 2, 3)]
        pushed = cached_tensors(cache)
        assert "model.layers.0.mlp.down_proj.weight.q" in pushed
        assert "model.layers.0.mlp.down_proj.weight" not in pushed
        (stats,) = plan.pushed.values()
        float_bytes = sum(f.stat().st_size for f in tiny_llama.glob("*.safetensors"))
        assert 0 < stats.bytes_sent < float_bytes / 4  # f32 in the folder, ~0.16 of it sent
        settings = {"dtype": "auto", "quantize": "int4"}
        tokens = _greedy(tiny_llama, plan.topology, "hi", **settings)
        local = _greedy(tiny_llama, None, "hi", **settings)
        assert tokens == local
        # A GGUF model: the same worker takes the new assignment, nothing is float on the wire.
        plan = asyncio.run(prepare_cluster(str(smollm2_gguf), options([worker.port], dtype="auto")))
        assert "serving blocks 0-29" in worker.log
        assert "int4 weights" in worker.log  # it timed the block as it will run it
        question = "What is the capital of France?"
        gguf_tokens = _greedy(smollm2_gguf, plan.topology, question, dtype="auto")
        local = _greedy(smollm2_gguf, None, question, dtype="auto")
        assert gguf_tokens == local
    finally:
        worker.stop()


def _bytes_on_disk(cache: Path) -> int:
    return sum(path.stat().st_size for path in cache.rglob("*") if path.is_file())


def _span(blocks: tuple[int, ...]) -> tuple[int, int]:
    return blocks[0], blocks[-1] + 1


@pytest.mark.slow
def test_interrupted_push_resumes_without_resending(tiny_llama: Path, tmp_path: Path) -> None:
    """The worker is killed mid-push and restarted; the same master run reconnects, and only
    what had not reached the worker's disk travels again."""
    cache = tmp_path / "cache"
    workers = [empty_worker("w", cache)]
    port = workers[0].port  # the restarted worker comes back on the same one
    payload = Payload(ModelManifest.for_folder(tiny_llama), LlamaConfig.from_folder(tiny_llama))
    items = payload.items(range(4))
    total = sum(item.nbytes for item in items)
    before = {"sent": 0, "held": -1}

    def crash_midway(worker_name: str, count: int) -> None:
        if before["held"] >= 0:
            return  # after the crash: the resumed push
        before["sent"] += count
        if before["sent"] >= total // 2:
            # Let the worker write some of what reached it to disk, then crash it.
            wait_until(lambda: _bytes_on_disk(cache) >= total // 4, timeout=60)
            workers[-1].kill()
            # What survived, as the restarted worker will count it.
            model = payload.model
            before["held"] = sum(
                ModelCache(cache).offer(999, item.offer(i, model)) for i, item in enumerate(items)
            )
            workers.append(empty_worker("w", cache, port, wait=False))
            raise LinkError("test: the connection to the worker broke")  # as send() would

    try:
        plan = asyncio.run(
            prepare_cluster(
                str(tiny_llama), options([port], on_sent=crash_midway, retry_timeout=120)
            )
        )
        assert 0 < before["held"] < total
        (stats,) = plan.pushed.values()
        assert stats.bytes_sent == before["sent"] + (total - before["held"])
        assert cached_tensors(cache) == block_names(range(4))
        tokens = _greedy(tiny_llama, plan.topology, "hi")
        assert tokens == reference_tokens(tiny_llama, encode(tiny_llama, "hi"), N_TOKENS)
        # A worker that crashes and is restarted loads its last assignment from its cache, so
        # the same topology works again with no push and no new plan.
        workers[-1].kill()
        workers.append(empty_worker("w", cache, port))
        assert "serving blocks 0-3" in workers[-1].log
        again = _greedy(tiny_llama, plan.topology, "hi")
        assert again == tokens
    finally:
        for worker in workers:
            worker.stop()


@pytest.mark.slow  # an empty worker process
def test_empty_worker_ready_file_names_the_port_it_bound(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    worker = empty_worker("w", tmp_path / "cache", extra=("--ready-file", str(ready)))
    try:
        assert json.loads(ready.read_text()) == {
            "name": f"127.0.0.1:{worker.port}",  # an empty worker is named by its address
            "host": "127.0.0.1",
            "port": worker.port,
            "pid": worker.proc.pid,
        }
    finally:
        worker.stop()


@pytest.mark.slow  # an empty worker process
def test_worker_with_another_key_receives_nothing(tiny_llama: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    worker = empty_worker("w", cache, key="some-other-key")
    try:
        with pytest.raises(WorkerError, match="cluster key mismatch"):
            asyncio.run(prepare_cluster(str(tiny_llama), options([worker.port])))
        assert asyncio.run(_offer_without_key(worker.port)) == "auth_required"
    finally:
        worker.stop()
    assert not any(path.is_dir() for path in cache.iterdir())  # no model folder, no tensor


async def _offer_without_key(port: int) -> str:
    """A stranger skips the handshake and offers a tensor: the error code it gets back."""
    link = await open_link("127.0.0.1", port, "worker", timeout=5)
    try:
        await link.send(
            PushOffer(
                id=0,
                model="ab" * 16,
                kind="file",
                name="config.json",
                dtype="",
                shape=[],
                nbytes=2,
                sha256="00" * 32,
            )
        )
        reply = await link.recv(timeout=5)
        assert isinstance(reply, ErrorMessage)
        return reply.code
    finally:
        await link.wait_closed()


def test_push_and_generate_over_tls_in_process(tiny_llama: Path, tmp_path: Path) -> None:
    """The whole flow over TLS: measure, push, assign, hand-over to forwards, generate."""
    import torch
    from test_security import make_certificate

    from cake.cluster.empty_worker import EmptyWorker
    from cake.wire.auth import client_tls, server_tls

    cert, key = make_certificate(tmp_path, "worker")

    async def run() -> tuple[list[int], list[int], dict]:
        empty = EmptyWorker(
            "tls-worker", ModelCache(tmp_path / "cache"), KEY.encode(), torch.device("cpu")
        )
        server = await asyncio.start_server(
            empty.handle_connection, "127.0.0.1", 0, ssl=server_tls(str(cert), str(key))
        )
        port = server.sockets[0].getsockname()[1]
        try:
            plan = await prepare_cluster(
                str(tiny_llama), options([port], tls=client_tls(str(cert)))
            )
            master = await Master.open(
                MasterSettings(
                    tiny_llama,
                    plan.topology,
                    device="cpu",
                    dtype="f32",
                    max_seq_len=SEQ_LEN,
                    cluster_key=KEY,
                    tls_ca=str(cert),
                ),
            )
            try:
                ids = master.encode("hi")
                tokens = [t async for t in master.generate(ids, GREEDY, N_TOKENS, ignore_eos=True)]
            finally:
                await master.close()
            return tokens, ids, {n.name: n.blocks for n in plan.topology.nodes}
        finally:
            server.close()
            empty.close()

    tokens, ids, blocks = asyncio.run(run())
    assert blocks == {"tls-worker": (0, 1, 2, 3)}
    assert tokens == reference_tokens(tiny_llama, ids, N_TOKENS)
