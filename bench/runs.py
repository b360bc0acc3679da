"""The timed configurations: transformers, cake local, cake master + N loopback workers.

Every configuration does the same work: prefill a prompt of random token ids, then N greedy
decode steps (argmax, no EOS stop), each step feeding the previous token through the whole
model. Prefill tok/s is prompt tokens / prefill seconds (the logits of the last position
included); decode tok/s is N / the seconds of those N steps.

transformers is timed with a manual greedy loop over `LlamaForCausalLM.forward` that carries the
model's own KV cache (a DynamicCache: `cache` in transformers 5, `past_key_values` before) and
asks for the last position's logits only (`logits_to_keep=1`), which is what `generate` does
inside, minus its logits processors and stopping checks.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from bench.cluster import even_layers, topology_entries
from bench.models import ModelSpec, blocks_bytes
from cake.cluster.local_cluster import WorkerProcess, start_local_cluster
from cake.decoding.sampling import SamplingParams
from cake.decoding.stats import GenerationStats
from cake.master import Master, MasterSettings

log = logging.getLogger("bench")

GREEDY = SamplingParams(temperature=0)
WARMUP_DECODE_STEPS = 4
_RUNNING: set[WorkerProcess] = set()  # stopped at exit if a finally never got to them


@dataclass
class Measurement:
    prefill_tok_s: float
    decode_tok_s: float
    tokens: list[int]  # the greedy tokens, to check that configurations did the same work
    round_trips_per_token: float = 0.0
    wire_ms_per_token: float = 0.0  # remote stages: round trip minus the workers' compute


@dataclass
class WorkerMemory:
    name: str
    blocks: range
    blocks_bytes: int
    rss_bytes: dict[str, int] = field(default_factory=dict)  # moment -> resident set


class TransformersRunner:
    label = "transformers"

    def __init__(self, spec: ModelSpec) -> None:
        from transformers import LlamaForCausalLM

        self.model = LlamaForCausalLM.from_pretrained(spec.folder, dtype=spec.torch_dtype).eval()
        parameters = inspect.signature(self.model.forward).parameters
        self.cache_name = "cache" if "cache" in parameters else "past_key_values"

    def _step(self, ids: torch.Tensor, cache: object) -> tuple[torch.Tensor, object]:
        """Feed ids (1, T); the greedy next token (1, 1) and the updated cache."""
        kwargs = {self.cache_name: cache} if cache is not None else {}
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs)
        return out.logits[:, -1].argmax(-1, keepdim=True), getattr(out, self.cache_name)

    async def run(self, prompt_ids: Sequence[int], steps: int) -> Measurement:
        with torch.inference_mode():
            ids = torch.tensor([list(prompt_ids)], dtype=torch.long)  # (1, T)
            started = time.perf_counter()
            token, cache = self._step(ids, None)
            prefill_s = time.perf_counter() - started
            tokens = [int(token)]
            started = time.perf_counter()
            for _ in range(steps):
                token, cache = self._step(token, cache)
                tokens.append(int(token))
            decode_s = time.perf_counter() - started
        return Measurement(len(prompt_ids) / prefill_s, steps / decode_s, tokens)

    async def close(self) -> None:
        del self.model


class CakeRunner:
    """A Master in this process: the whole model locally, or in front of worker processes."""

    def __init__(
        self,
        label: str,
        master: Master,
        workers: Sequence[WorkerProcess] = (),
        memory: Sequence[WorkerMemory] = (),
        folder: tempfile.TemporaryDirectory | None = None,
    ) -> None:
        self.label = label
        self.master = master
        self.workers = list(workers)
        self.memory = list(memory)
        self._folder = folder

    @classmethod
    async def local(cls, spec: ModelSpec, max_seq_len: int) -> CakeRunner:
        master = await Master.open(
            MasterSettings(spec.folder, device="cpu", dtype=spec.dtype, max_seq_len=max_seq_len)
        )
        return cls("cake local", master)

    @classmethod
    async def loopback(
        cls, spec: ModelSpec, n_workers: int, max_seq_len: int, threads: int
    ) -> CakeRunner:
        """Master + `n_workers` worker processes on 127.0.0.1, blocks split evenly."""
        folder = tempfile.TemporaryDirectory(prefix="cake-bench-")
        topology = Path(folder.name) / "topology.yml"
        split = even_layers(spec.config["num_hidden_layers"], n_workers)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
        extra = ("--device", "cpu", "--dtype", spec.dtype, "--max-seq-len", str(max_seq_len))
        log.info("starting %d workers on free ports of 127.0.0.1", n_workers)
        workers = start_local_cluster(
            spec.folder, topology_entries(split), topology, extra=extra, env=env
        )
        _RUNNING.update(workers)
        try:
            master = await Master.open(
                MasterSettings(
                    spec.folder,
                    topology=topology,
                    device="cpu",
                    dtype=spec.dtype,
                    max_seq_len=max_seq_len,
                ),
            )
        except BaseException:
            stop_workers(workers)
            folder.cleanup()
            raise
        memory = [
            WorkerMemory(name, blocks, blocks_bytes(spec, list(blocks)))
            for name, blocks in split.items()
        ]
        runner = cls(f"cake + {n_workers} workers", master, workers, memory, folder)
        runner.record_rss("after load")
        return runner

    def record_rss(self, moment: str) -> None:
        for worker, memory in zip(self.workers, self.memory, strict=True):
            memory.rss_bytes[moment] = psutil.Process(worker.proc.pid).memory_info().rss

    async def run(self, prompt_ids: Sequence[int], steps: int) -> Measurement:
        stats = GenerationStats()
        tokens = [
            token
            async for token in self.master.generate(
                prompt_ids, GREEDY, steps + 1, ignore_eos=True, stats=stats
            )
        ]
        steps_run = stats.decode_steps + 1  # the prefill is a step of the pipeline too
        remote = [times for label, times in stats.stages.items() if label != "master"]
        return Measurement(
            prefill_tok_s=stats.prefill_tok_s,
            decode_tok_s=stats.decode_tok_s,
            tokens=tokens,
            round_trips_per_token=stats.round_trips / steps_run,
            wire_ms_per_token=sum(t.wire_s for t in remote) / steps_run * 1e3,
        )

    async def close(self) -> None:
        try:
            await self.master.close()
        finally:
            stop_workers(self.workers)
            if self._folder is not None:
                self._folder.cleanup()


Runner = TransformersRunner | CakeRunner


def stop_workers(workers: Sequence[WorkerProcess]) -> None:
    for worker in workers:
        worker.stop()
        _RUNNING.discard(worker)


@atexit.register
def _stop_running() -> None:
    stop_workers(list(_RUNNING))


async def warm_up(runners: Sequence[Runner], prompt_ids: Sequence[int]) -> None:
    """One untimed generation each: first-call costs (allocations, kernel choice) stay out."""
    for runner in runners:
        log.info("warm-up: %s", runner.label)
        await runner.run(prompt_ids, WARMUP_DECODE_STEPS)
        if isinstance(runner, CakeRunner) and runner.workers:
            runner.record_rss("after 1 generation")


async def alternate(
    runners: Sequence[Runner], prompt_ids: Sequence[int], steps: int, rounds: int
) -> dict[str, list[Measurement]]:
    """Each round runs every configuration once, in reversed order every other round.

    Ratios are taken within a round (config and baseline measured back to back), so load that
    other processes put on the machine cancels out as far as it can; the reversal stops one
    configuration from always following the same neighbour.
    """
    results: dict[str, list[Measurement]] = {runner.label: [] for runner in runners}
    for round_index in range(rounds):
        order = runners if round_index % 2 == 0 else list(reversed(runners))
        for runner in order:
            measured = await runner.run(prompt_ids, steps)
            results[runner.label].append(measured)
            log.info(
                "round %d/%d %-18s decode %7.2f tok/s, prefill %7.1f tok/s",
                round_index + 1,
                rounds,
                runner.label,
                measured.decode_tok_s,
                measured.prefill_tok_s,
            )
    for runner in runners:
        if isinstance(runner, CakeRunner) and runner.workers:
            runner.record_rss("after all rounds")
    return results
