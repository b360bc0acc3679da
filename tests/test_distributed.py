"""Distributed == local == transformers: workers on loopback, in-process and as subprocesses."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from cluster import N_TOKENS, cluster, generate
from helpers import encode, greedy_tokens, reference_tokens, run_cli, until

from cake.cluster.local_cluster import start_local_cluster
from cake.decoding.stats import GenerationStats
from cake.errors import WorkerError
from cake.master import Master, MasterSettings

TOPOLOGIES = {
    "two workers": ({"w1": ["model.layers.0-1"], "w2": ["model.layers.2-3"]}, 2),
    "three uneven": (
        {"w1": ["model.layers.0"], "w2": ["model.layers.1-2"], "w3": ["model.layers.3"]},
        3,
    ),
    "two ranges on one worker, last block on master": (
        {"w1": ["model.layers.0", "model.layers.2"], "w2": ["model.layers.1"]},
        3,
    ),
    "first and last blocks on master": ({"w1": ["model.layers.1-2"]}, 1),
    "adjacent entries merge into one run": (
        {"w1": ["model.layers.0-1", "model.layers.2"], "w2": ["model.layers.3"]},
        2,
    ),
}


@pytest.fixture(scope="module")
def tiny_expected(tiny_llama: Path) -> dict[str, list[int]]:
    """Local greedy tokens for two prompts, checked once against transformers."""
    expected = {p: greedy_tokens(tiny_llama, p, N_TOKENS) for p in ("hi", "tell me a story")}
    for prompt, tokens in expected.items():
        assert tokens == reference_tokens(tiny_llama, encode(tiny_llama, prompt), N_TOKENS)
    return expected


@pytest.mark.parametrize("name", list(TOPOLOGIES))
def test_distributed_equals_local_and_reference(
    name: str, tiny_llama: Path, tiny_expected: dict[str, list[int]], tmp_path: Path
) -> None:
    layers, remote_runs = TOPOLOGIES[name]

    async def run() -> None:
        async with cluster(tiny_llama, tmp_path, layers) as (topology, _):
            master = await Master.open(
                MasterSettings(tiny_llama, topology, device="cpu", dtype="f32")
            )
            try:
                tokens, stats = await generate(master, "hi")
            finally:
                await master.close()
        assert tokens == tiny_expected["hi"]
        steps = stats.decode_steps + 1  # the prefill is a step too
        assert stats.round_trips == remote_runs * steps

    asyncio.run(run())


def test_two_masters_at_once_get_their_solo_output(
    tiny_llama: Path, tiny_expected: dict[str, list[int]], tmp_path: Path
) -> None:
    layers = {"w1": ["model.layers.0-1"], "w2": ["model.layers.2-3"]}

    async def run() -> None:
        async with cluster(tiny_llama, tmp_path, layers) as (topology, workers):
            masters = [
                await Master.open(MasterSettings(tiny_llama, topology, device="cpu", dtype="f32"))
                for _ in range(2)
            ]
            try:
                results = await asyncio.gather(
                    generate(masters[0], "hi", N_TOKENS),
                    generate(masters[1], "tell me a story", N_TOKENS),
                )
            finally:
                for master in masters:
                    await master.close()
            # The workers forget both sessions once they read the masters' close messages.
            await until(lambda: all(w.session_count == 0 for w in workers.values()))
        assert results[0][0] == tiny_expected["hi"]
        assert results[1][0] == tiny_expected["tell me a story"]

    asyncio.run(run())


def test_worker_serving_other_blocks_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    layers = {"w1": ["model.layers.0-2"]}

    async def run() -> None:
        serve_as = {"w1": {"host": "127.0.0.1:1", "layers": ["model.layers.0-1"]}}
        async with cluster(tiny_llama, tmp_path, layers, serve_as) as (topology, _):
            with pytest.raises(
                WorkerError,
                match=r"w1 .*serves blocks \[0, 1\], but the "
                r"topology gives it \[0, 1, 2\]",
            ):
                await Master.open(MasterSettings(tiny_llama, topology, device="cpu", dtype="f32"))

    asyncio.run(run())


def test_worker_with_another_model_is_refused(
    tiny_llama: Path, tiny_llama_tied: Path, tmp_path: Path
) -> None:
    async def run() -> None:
        async with cluster(tiny_llama, tmp_path, {"w1": ["model.layers.0"]}) as (topology, _):
            with pytest.raises(WorkerError, match="different model"):
                await Master.open(
                    MasterSettings(tiny_llama_tied, topology, device="cpu", dtype="f32")
                )

    asyncio.run(run())


def test_unreachable_worker_names_worker_and_address(tiny_llama: Path, tmp_path: Path) -> None:
    with socket.socket() as listener:  # bound but not listening: connections are refused
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        topology = tmp_path / "topology.yml"
        topology.write_text(f"gone:\n  host: '127.0.0.1:{port}'\n  layers: ['model.layers.0']\n")
        with pytest.raises(WorkerError, match=rf"worker gone at 127\.0\.0\.1:{port}.*running"):
            asyncio.run(
                Master.open(MasterSettings(tiny_llama, topology, device="cpu", connect_timeout=2))
            )


@pytest.mark.slow
def test_smollm2_over_worker_processes(smollm2_dir: Path, tmp_path: Path) -> None:
    """Real weights, real worker processes: 2 uneven workers plus 2 blocks on the master."""
    topology = tmp_path / "topology.yml"
    prompt, n = "What is the capital of France?", 16
    local = greedy_tokens(smollm2_dir, prompt, n)
    layers = {"w1": ["model.layers.0-9"], "w2": ["model.layers.10-27"]}
    workers = start_local_cluster(smollm2_dir, layers, topology)
    try:

        async def run() -> tuple[list[int], GenerationStats, list[int]]:
            master = await Master.open(
                MasterSettings(smollm2_dir, topology, device="cpu", dtype="f32")
            )
            try:
                tokens, stats = await generate(master, prompt, n)
                return tokens, stats, master.encode(prompt)
            finally:
                await master.close()

        tokens, stats, prompt_ids = asyncio.run(run())
        # cake-cli (in this process) as the master: stdout is exactly the local run's text.
        args = [
            "--model",
            str(smollm2_dir),
            "--prompt",
            prompt,
            "--temperature",
            "0",
            "-n",
            "24",
            "--device",
            "cpu",
        ]
        remote_cli = run_cli(*args, "--topology", str(topology))
        local_cli = run_cli(*args)
    finally:
        for worker in workers:
            worker.stop()
    assert tokens == local
    assert tokens == reference_tokens(smollm2_dir, prompt_ids, n)
    assert stats.round_trips == 2 * (stats.decode_steps + 1)
    assert remote_cli.exit_code == 0, remote_cli.stderr
    assert remote_cli.stdout == local_cli.stdout
    assert "Paris" in remote_cli.stdout
    assert "round trips/token: 2.00" in remote_cli.stderr


def test_round_trip_per_block_debug_mode_counts_each_block(
    tiny_llama: Path, tiny_expected: dict[str, list[int]], tmp_path: Path
) -> None:
    layers = {"w1": ["model.layers.0-2"]}  # block 3 on the master

    async def run() -> None:
        async with cluster(tiny_llama, tmp_path, layers) as (topology, _):
            master = await Master.open(
                MasterSettings(
                    tiny_llama, topology, device="cpu", dtype="f32", round_trip_per_block=True
                )
            )
            try:
                tokens, stats = await generate(master, "hi")
            finally:
                await master.close()
        assert tokens == tiny_expected["hi"]
        assert stats.round_trips == 3 * (stats.decode_steps + 1)

    asyncio.run(run())
