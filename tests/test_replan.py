"""A worker lost for good in a cluster the master planned itself: plan again, resume sessions."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cluster import GREEDY
from helpers import reference_tokens, run_cli
from test_cluster_setup import KEY, SEQ_LEN, cached_tensors, empty_worker, options

from cake.cluster.measure import block_bytes
from cake.cluster.setup import prepare_cluster, replanning
from cake.decoding.stats import GenerationStats
from cake.engine.pipeline import Replanning
from cake.errors import WorkerGone
from cake.master import Master, MasterSettings
from cake.model.config import LlamaConfig
from cake.topology import Topology

N_TOKENS = 12
KILL_AFTER = 4  # tokens of the first session before its worker is killed


async def open_master(
    folder: Path,
    topology: Topology,
    retry_timeout: float,
    replanning: Replanning | None = None,
    serving: bool = False,
) -> Master:
    options = dict(
        model=folder,
        topology=topology,
        device="cpu",
        dtype="f32",
        max_seq_len=SEQ_LEN,
        cluster_key=KEY,
        retry_timeout=retry_timeout,
        replanning=replanning,
    )
    settings = MasterSettings.serving(**options) if serving else MasterSettings(**options)
    return await Master.open(settings)


@pytest.mark.slow
@pytest.mark.parametrize(
    "batched", [False, True], ids=["one session, master takes over", "batched, spare worker"]
)
def test_lost_worker_is_planned_around_and_sessions_resume(
    tiny_llama: Path, tmp_path: Path, batched: bool
) -> None:
    """Two workers hold blocks 0-1 and 2-3; one is killed mid-generation and does not come
    back. The master plans again over what answers: the survivor and itself, or (batched) the
    survivor and a spare worker that a new discovery finds, which is pushed the lost blocks
    then. Every session ends with transformers' greedy text."""
    config = LlamaConfig.from_folder(tiny_llama)
    room = int(2.5 * block_bytes(config, torch.float32, SEQ_LEN))  # two blocks each, not three
    count = 3 if batched else 2
    caches = [tmp_path / f"cache{i}" for i in range(count)]
    workers = [empty_worker(f"w{i}", cache, max_memory=room) for i, cache in enumerate(caches)]
    ports = [worker.port for worker in workers[:2]]  # a spare (batched) is found later
    prompts = ["hi", "tell me a story"] if batched else ["hi"]

    async def run() -> tuple[list[list[int]], list[list[int]], Master, list[int]]:
        plan = await prepare_cluster(str(tiny_llama), options(ports))
        assert sorted(node.blocks for node in plan.topology.nodes) == [(0, 1), (2, 3)]
        planned = [node.port for node in plan.topology.nodes]
        # Without a spare, the survivor has room for two blocks: the master takes the rest.
        master_blocks = 0 if batched else None

        async def rediscover() -> list[str]:  # as --discover would find them now
            return [f"127.0.0.1:{worker.port}" for worker in workers]

        plan_again = replanning(
            str(tiny_llama),
            options(ports, master_blocks=master_blocks),
            rediscover if batched else None,
        )
        master = await open_master(
            tiny_llama, plan.topology, retry_timeout=1, replanning=plan_again, serving=batched
        )
        victim = next(w for w in workers if w.port == planned[0])
        try:
            ids = [master.encode(prompt) for prompt in prompts]

            async def generate(index: int) -> list[int]:
                tokens = []
                async for token in master.generate(ids[index], GREEDY, N_TOKENS, True):
                    tokens.append(token)
                    if index == 0 and len(tokens) == KILL_AFTER:
                        victim.kill()
                return tokens

            outputs = await asyncio.gather(*(generate(i) for i in range(len(prompts))))
            # The next turn forks the first session, kept on the new stages it finished on.
            follow = [*ids[0], *outputs[0], 13]
            stats = GenerationStats()
            after = [t async for t in master.generate(follow, GREEDY, N_TOKENS, True, stats)]
            assert stats.cached_tokens == len(ids[0]) + N_TOKENS - 1
            return [*outputs, after], [*ids, follow], master, planned
        finally:
            await master.close()

    try:
        outputs, ids, master, planned = asyncio.run(run())
        for tokens, prompt_ids in zip(outputs, ids, strict=True):
            assert tokens == reference_tokens(tiny_llama, prompt_ids, N_TOKENS)
        assert master.pipeline.epoch == 1  # one re-plan served every session
        if batched:  # the spare worker now holds the two blocks the victim had
            spare = next(i for i, worker in enumerate(workers) if worker.port not in planned)
            assert len(cached_tensors(caches[spare])) == 2 * 9
            assert "serving blocks" in workers[spare].log
    finally:
        for worker in workers:
            worker.stop()


@pytest.mark.slow  # an empty worker process, killed
def test_without_a_plan_of_its_own_a_lost_worker_ends_the_generation(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """A hand-written topology (no --workers): the loss is reported, nothing is re-planned."""
    worker = empty_worker("w", tmp_path / "cache")
    try:

        async def run() -> None:
            plan = await prepare_cluster(str(tiny_llama), options([worker.port]))
            master = await open_master(tiny_llama, plan.topology, retry_timeout=0.5)
            try:
                ids = master.encode("hi")
                with pytest.raises(WorkerGone, match="did not come back"):
                    async for _ in master.generate(ids, GREEDY, N_TOKENS, True):
                        worker.kill()
            finally:
                await master.close()

        asyncio.run(run())
    finally:
        worker.stop()


def test_session_inputs_keep_each_forward_for_the_replay() -> None:
    """What a stage received is replayed forward by forward, as it was sent (a rollback trims
    the last ones): the worker then computes exactly the products it computed before."""
    from cake.engine.remote_stage import SessionInputs

    inputs = SessionInputs()
    inputs.add(0, torch.zeros(1, 5, 4))  # the prompt
    for position in range(5, 9):
        inputs.add(position, torch.full((1, 1, 4), float(position)))  # decode steps
    inputs.add(9, torch.zeros(1, 4, 4))  # a verification of 4 positions ...
    inputs.truncate(11)  # ... of which 2 were kept
    assert [chunk.shape[1] for chunk in inputs.chunks] == [5, 1, 1, 1, 1, 2]
    inputs.add(7, torch.ones(1, 1, 4))  # a rewind to position 7
    assert [chunk.shape[1] for chunk in inputs.chunks] == [5, 1, 1, 1]
    assert inputs.length == 8


def test_resumed_steps_run_again_as_they_ran() -> None:
    """After a re-plan a session's earlier forwards run on the new stages one by one, as they
    ran (the prompt, then each token; a rolled-back verification only as far as it was kept),
    before the forward that was asked for."""
    from cake.engine.session import Output, Session
    from cake.errors import StagesReplaced

    calls: list[tuple[list[int], int, Output]] = []
    fail_next = [False]

    class FakePipeline:
        epoch = 0

        async def recover(self, cause: Exception, epoch: int) -> None:
            self.epoch += 1

        async def rollback(self, session_id: str, length: int) -> None:
            pass

    class FakeSteps:
        async def run(self, session: Session, tokens: list[int], start: int, output: Output):
            if fail_next[0]:
                fail_next[0] = False
                raise StagesReplaced("test: the cluster was re-planned")
            calls.append((list(tokens), start, output))
            return torch.zeros(3)

    async def run() -> None:
        session = Session(FakeSteps(), FakePipeline())  # type: ignore[arg-type]
        await session.forward([1, 2, 3], 0)
        for position, token in ((3, 4), (4, 5)):
            await session.forward([token], position)
        await session.forward([6, 7, 8, 9], 5, Output.ALL_LOGITS)  # a verification ...
        await session.rollback(7)  # ... of which [6, 7] were kept
        fail_next[0] = True
        calls.clear()
        await session.forward([10], 7)

    asyncio.run(run())
    replayed = [(tokens, start) for tokens, start, output in calls if output is Output.NOTHING]
    assert replayed == [([1, 2, 3], 0), ([4], 3), ([5], 4), ([6, 7], 5)]
    assert calls[-1] == ([10], 7, Output.LAST_LOGITS)


@pytest.mark.slow
def test_cli_quantized_push_gives_the_local_quantized_text(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """`cake-cli --workers … --quantize int4` end to end (the master in this process, the
    worker a process): the worker holds int4 tensors, and the text is the one
    `cake-cli --quantize int4` prints alone."""
    cache = tmp_path / "cache"
    worker = empty_worker("w", cache)
    try:
        common = ["--model", str(tiny_llama), "--quantize", "int4", "--prompt", "hi", "-n", "8"]
        common += ["--ignore-eos", "--temperature", "0", "--device", "cpu"]
        cluster_args = ["--workers", f"127.0.0.1:{worker.port}", "--cluster-key", KEY]
        pushed = run_cli(*common, *cluster_args, "--master-blocks", "0")
        alone = run_cli(*common)
        assert pushed.exit_code == 0, pushed.stderr
        assert pushed.stdout == alone.stdout and pushed.stdout.strip()
        held = cached_tensors(cache)
        assert "model.layers.0.self_attn.q_proj.weight.q" in held
        assert "model.layers.0.self_attn.q_proj.weight" not in held
    finally:
        worker.stop()


@pytest.mark.slow
def test_cli_replans_a_gguf_cluster_around_a_lost_worker(
    smollm2_gguf: Path, tmp_path: Path
) -> None:
    """`cake-cli --model demo.gguf --workers a,b`: a worker holding blocks is SIGKILLed mid-answer
    and does not come back; the command re-plans (the survivor and the master take the blocks)
    and prints the same text as a run without the loss."""
    workers = [empty_worker(f"w{i}", tmp_path / f"cache{i}") for i in range(2)]
    addresses = ",".join(f"127.0.0.1:{w.port}" for w in workers)
    args = [
        "--model", str(smollm2_gguf), "--workers", addresses, "--cluster-key", KEY,
        "--prompt", "Tell me a long story about a dragon.", "-n", "160", "--ignore-eos",
        "--temperature", "0", "--retry-timeout", "2", "--device", "cpu",
    ]  # fmt: skip
    command = [sys.executable, "-m", "cake.cli", *args]
    try:
        clean = run_cli(*args)  # the run without a loss, in this process
        assert clean.exit_code == 0, clean.stderr
        run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert run.stdout is not None
        head = b""
        while len(head) < 200:  # part of the answer is out: now lose a worker that holds blocks
            chunk = os.read(run.stdout.fileno(), 4096)
            assert chunk, run.stderr.read() if run.stderr else ""
            head += chunk
        next(
            w for w in workers if "serving blocks" in w.log.split("waiting for a master")[-1]
        ).kill()
        rest, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr.decode()
        assert b"re-planned" in stderr
        assert (head + rest).decode() == clean.stdout
    finally:
        for worker in workers:
            worker.stop()
