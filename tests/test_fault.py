"""Worker loss: killed mid-generation and restarted (same text, nothing printed twice), gone for
good (a clear error, the text so far kept), restarted while the master is idle (picked up).

Real worker processes, killed with SIGKILL as a crash would: every test here is `slow`. Each
test starts its own workers, since each kills one."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import GREEDY
from cluster import ProcessCluster as Cluster
from helpers import greedy_tokens

from cake.cluster.local_cluster import start_local_cluster
from cake.decoding.stats import GenerationStats
from cake.errors import WorkerError
from cake.master import Master, MasterSettings

N = 40

pytestmark = pytest.mark.slow


@pytest.fixture
def two_workers(tiny_llama: Path, tmp_path: Path) -> Iterator[Cluster]:
    layers = {"w1": ["model.layers.0-1"], "w2": ["model.layers.2-3"]}
    cluster = Cluster(tiny_llama, tmp_path / "topology.yml", layers)
    yield cluster
    cluster.stop()


async def open_master(cluster: Cluster, retry_timeout: float = 60) -> Master:
    return await Master.open(
        MasterSettings(
            cluster.model, cluster.topology, device="cpu", dtype="f32", retry_timeout=retry_timeout
        )
    )


def test_worker_killed_and_restarted_mid_generation(two_workers: Cluster) -> None:
    expected = greedy_tokens(two_workers.model, "hi", N)
    restarted = threading.Thread()

    async def run() -> tuple[list[int], GenerationStats]:
        nonlocal restarted
        master = await open_master(two_workers)
        stats = GenerationStats()
        tokens: list[int] = []
        try:
            async for token in master.generate(
                master.encode("hi"), GREEDY, N, ignore_eos=True, stats=stats
            ):
                tokens.append(token)
                if len(tokens) == 10:
                    two_workers.kill("w2")  # SIGKILL, as a crash
                    restarted = threading.Thread(target=two_workers.restart, args=("w2",))
                    restarted.start()
        finally:
            await master.close()
        return tokens, stats

    tokens, stats = asyncio.run(run())
    restarted.join()
    assert tokens == expected  # same text, and no token twice
    # w2's stage replayed the 10 forwards it had received (the prompt, 9 decode steps), one
    # round trip each, on top of 2 per step.
    assert stats.round_trips == 2 * (stats.decode_steps + 1) + 10


def test_quantized_blocks_replay_to_the_same_text(smollm2_gguf: Path, tmp_path: Path) -> None:
    """The demo GGUF's int4 kernels round a many-row product unlike one row at a time, so a
    replay must send each forward as it was first sent: replayed in 512-position chunks, this
    text changed ~100 tokens after the fault."""
    layers = {"w1": ["model.layers.0-14"], "w2": ["model.layers.15-29"]}
    cluster = Cluster(smollm2_gguf, tmp_path / "topology.yml", layers)
    prompt, n = "Tell me a long story about a dragon.", 160

    async def run(kill_after: int | None) -> list[int]:
        master = await Master.open(
            MasterSettings(cluster.model, cluster.topology, device="cpu", dtype="auto")
        )
        tokens: list[int] = []
        try:
            async for token in master.generate(master.encode(prompt), GREEDY, n, True):
                tokens.append(token)
                if len(tokens) == kill_after:
                    cluster.kill("w1")
                    cluster.restart("w1")  # blocks this loop: the master notices afterwards
        finally:
            await master.close()
        return tokens

    try:
        expected = asyncio.run(run(None))
        assert asyncio.run(run(30)) == expected
    finally:
        cluster.stop()


def test_worker_gone_for_good_gives_a_clear_error(two_workers: Cluster) -> None:
    async def run() -> list[int]:
        master = await open_master(two_workers, retry_timeout=1.5)
        tokens: list[int] = []
        try:
            async for token in master.generate(master.encode("hi"), GREEDY, N, True):
                tokens.append(token)
                if len(tokens) == 5:
                    two_workers.kill("w2")
        finally:
            await master.close()
        return tokens

    with pytest.raises(
        WorkerError,
        match=r"worker w2 at 127\.0\.0\.1:\d+ did not come back "
        r"within 1\.5s \(--retry-timeout\)",
    ):
        asyncio.run(run())


def test_worker_restarted_while_idle_is_picked_up(two_workers: Cluster) -> None:
    async def run() -> tuple[list[int], list[int]]:
        master = await open_master(two_workers)
        try:
            first = [t async for t in master.generate(master.encode("hi"), GREEDY, 8, True)]
            two_workers.kill("w1")
            await asyncio.to_thread(two_workers.restart, "w1")
            second = [t async for t in master.generate(master.encode("hi"), GREEDY, 8, True)]
        finally:
            await master.close()
        return first, second

    first, second = asyncio.run(run())
    assert first == second


def test_cli_keeps_the_text_so_far_when_a_worker_is_lost(tiny_llama: Path, tmp_path: Path) -> None:
    """The only worker is killed for good once the text is streaming: cake-cli ends with the
    named error, and what it printed is exactly the unfaulted greedy text's first tokens (as the
    CLI prints a cut run: the text of the tokens so far, then a newline)."""
    topology = tmp_path / "topology.yml"
    (worker,) = start_local_cluster(
        tiny_llama,
        {"w1": ["model.layers.0-3"]},
        topology,
        extra=("--device", "cpu", "--max-seq-len", "4096"),
    )
    port = worker.port
    master = subprocess.Popen(
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
            "--temperature",
            "0",
            "-n",
            "4000",
            "--ignore-eos",
            "--max-seq-len",
            "4096",
            "--retry-timeout",
            "1",
            "--device",
            "cpu",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,  # unbuffered: communicate() below reads the pipe itself, past any buffer
    )
    try:
        first = master.stdout.read(1)  # text is streaming: the generation is under way
        worker.kill()
        rest, stderr = master.communicate(timeout=60)
    finally:
        master.kill()
        worker.stop()
    assert master.returncode == 1
    assert f"worker w1 at 127.0.0.1:{port} did not come back within 1s" in stderr.decode()
    printed = (first + rest).decode()
    assert _tokens_printed(tiny_llama, "hi", printed) >= 1, printed


def _tokens_printed(model: Path, prompt: str, printed: str) -> int:
    """m such that `printed` is the text of the unfaulted greedy run's first m tokens and a
    newline (how the CLI ends a cut run); fails if there is no such m. (The worker is killed
    right after the first byte: a few tokens at most get out, far fewer than the 500 the
    model's context holds.)"""
    from cake.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model)
    tokens = greedy_tokens(model, prompt, 500)
    texts: list[str] = []
    for m in range(len(tokens) + 1):
        texts.append(tokenizer.decode(tokens[:m], skip_special_tokens=True) + "\n")
        if len(texts[-1]) > len(printed) + 8:
            break
    matches = [m for m, text in enumerate(texts) if text == printed]
    assert matches, f"printed {printed!r}: not the start of the unfaulted text {texts[-1]!r}"
    return max(matches)


def test_worker_killed_during_batched_steps(two_workers: Cluster) -> None:
    """Three sessions batched through two worker processes; w2 is killed mid-generation and
    restarted: every session in the batch is replayed and gets its solo text."""
    prompts = ["hi", "tell me more", "why"]
    expected = [greedy_tokens(two_workers.model, p, N) for p in prompts]
    restarted = threading.Thread()

    async def run() -> list[list[int]]:
        nonlocal restarted
        master = await Master.open(
            MasterSettings.serving(
                model=two_workers.model, topology=two_workers.topology, device="cpu", dtype="f32"
            )
        )

        async def one(prompt: str, kill: bool) -> list[int]:
            nonlocal restarted
            tokens: list[int] = []
            async for token in master.generate(master.encode(prompt), GREEDY, N, True):
                tokens.append(token)
                if kill and len(tokens) == 10:
                    two_workers.kill("w2")
                    restarted = threading.Thread(target=two_workers.restart, args=("w2",))
                    restarted.start()
            return tokens

        try:
            return await asyncio.gather(*(one(p, i == 0) for i, p in enumerate(prompts)))
        finally:
            await master.close()

    results = asyncio.run(run())
    restarted.join()
    assert results == expected
