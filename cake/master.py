"""The master: tokenizer, embedding, stages (local or remote), head, sampling, generation.

`Master.generate` is an async generator that yields token ids as they are chosen. It owns the
positions (`start_pos`) and passes them to every stage, so a stage never guesses where it is.
A prompt goes through the stages in chunks of `prefill_chunk` positions (`forward_chunks`), so
frames and activations stay bounded for any prompt the context allows; chunk k+1 enters a stage
as soon as chunk k has left it, so with several stages the chunks flow as a pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cake.auth import client_tls
from cake.auth import cluster_key as parse_cluster_key
from cake.batching import DEFAULT_PREFILL_CHUNK as BATCH_PREFILL_CHUNK
from cake.batching import StepScheduler
from cake.chat import encode_prompt, load_tokenizer, stop_token_ids
from cake.config import LlamaConfig, architecture_of
from cake.devices import resolve_device
from cake.errors import ContextError
from cake.gguf import resolve_model_path
from cake.liveness import LivenessSettings
from cake.model import Llama
from cake.protocol import fingerprint_config, session_frame_limit
from cake.remote import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_RETRY_TIMEOUT_S,
    RemoteStage,
    WorkerClient,
)
from cake.sampling import Sampler, SamplingParams
from cake.sessions import SessionStore, check_worker_limits, kv_budget
from cake.stages import LocalStage, Stage, StageTimes
from cake.topology import Run, Topology, format_blocks, load_topology
from cake.weights import Quantization, activation_dtype, describe_part, load_llama

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LEN = 4096
DEFAULT_PREFILL_CHUNK = 512  # positions per prefill request (--prefill-chunk)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    finish_reason: str = ""  # "stop" (an EOS token) or "length" (sample length or context)
    stages: dict[str, StageTimes] = field(default_factory=dict)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s else 0.0

    @property
    def round_trips(self) -> int:
        return sum(t.round_trips for t in self.stages.values())

    def summary(self) -> str:
        line = (
            f"prompt tokens: {self.prompt_tokens}, new tokens: {self.new_tokens}, "
            f"prefill: {self.prefill_tok_s:.1f} tok/s, decode: {self.decode_tok_s:.1f} tok/s"
        )
        steps = self.decode_steps + 1 if self.prompt_tokens else 0
        if self.round_trips and steps:
            line += f", round trips/token: {self.round_trips / steps:.2f}"
        return line

    def stage_lines(self) -> list[str]:
        steps = max(self.decode_steps + 1, 1)
        return [
            f"stage {label}: compute {t.compute_s / steps * 1e3:.2f} ms/token, "
            f"wire {t.wire_s / steps * 1e3:.2f} ms/token, {t.round_trips} round trips"
            for label, t in self.stages.items()
        ]


class Master:
    """One model, served by local and remote stages; each `generate` call is its own session."""

    def __init__(
        self,
        folder: Path,
        config: LlamaConfig,
        tokenizer: Any,
        model: Llama,
        stages: list[Stage],
        max_seq_len: int,
        offload: bool = False,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        store: SessionStore | None = None,
    ) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"--prefill-chunk must be at least 1, got {prefill_chunk}")
        self.folder = folder
        self.config = config
        self.tokenizer = tokenizer
        self.model = model  # embedding, head, and any block no worker serves
        self.stages = stages
        self.max_seq_len = max_seq_len
        self.stop_ids = stop_token_ids(folder, config, tokenizer)
        self.device = model.device
        self.offload = offload  # run the master's own tensor work in a thread (HTTP API)
        self.prefill_chunk = prefill_chunk
        self.pipeline_prefill = True  # chunks overlap across stages (off: one chunk at a time)
        self.store = store  # the KV caches of the blocks the master runs itself
        # With several sessions at once (the HTTP API), their steps are batched; a single CLI
        # generation runs its steps directly.
        self.scheduler: StepScheduler | None = None

    def enable_batching(self, groups: int = 1, prefill_chunk: int | None = None) -> StepScheduler:
        """Batch the steps of concurrent generations (see cake/batching.py). A prompt goes in
        chunks of at most `prefill_chunk` positions per step, so it never stalls the others'
        decode for long."""
        self.scheduler = StepScheduler(
            self.model.embed,
            self.stages,
            self.model.head,
            self._local,
            self.device,
            groups=groups,
            prefill_chunk=prefill_chunk or min(self.prefill_chunk, BATCH_PREFILL_CHUNK),
        )
        return self.scheduler

    @classmethod
    async def open(
        cls,
        model: str | Path,
        topology: str | Path | Topology | None = None,
        device: str = "auto",
        dtype: str = "auto",
        max_seq_len: int | None = None,
        offload: bool = False,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT_S,
        cluster_key: str | None = None,
        tls_ca: str | None = None,
        round_trip_per_block: bool = False,
        quantize: str | None = None,
        kv_memory: str | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        liveness: LivenessSettings | None = None,
    ) -> Master:
        """Load the master's part of the model, connect to the workers, build the stages."""
        folder = resolve_model_path(model)
        config = LlamaConfig.from_folder(folder)
        tokenizer = load_tokenizer(folder)
        torch_device = resolve_device(device)
        quantization = Quantization(quantize) if quantize else None
        torch_dtype = activation_dtype(dtype, torch_device, folder, config, quantization)
        seq_len = max_seq_len or min(config.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
        if seq_len > config.max_position_embeddings:
            log.warning(
                "--max-seq-len %d is beyond the %d positions the model was trained for; "
                "output quality past that is not guaranteed",
                seq_len,
                config.max_position_embeddings,
            )
        runs = _runs(topology, config.n_layers)
        if round_trip_per_block:  # debug/benchmark mode: shows what one trip per run saves
            runs = [single for run in runs for single in _one_per_block(run)]
        local_blocks = [b for run in runs if run.node is None for b in run.blocks]
        if topology is not None and local_blocks:
            log.info(
                "no worker lists blocks %s: they run on the master", format_blocks(local_blocks)
            )
        fingerprint = fingerprint_config(architecture_of(config))
        key, tls = parse_cluster_key(cluster_key), client_tls(tls_ca)
        clients = {
            run.node.name: WorkerClient(
                run.node,
                fingerprint,
                connect_timeout=connect_timeout,
                retry_timeout=retry_timeout,
                cluster_key=key,
                tls=tls,
                liveness=liveness,
                max_frame_bytes=session_frame_limit(config.hidden_size, seq_len),
            )
            for run in runs
            if run.node is not None
        }
        # Workers first: an unreachable or mismatched worker fails in seconds, before a
        # possibly long load of the master's part.
        try:
            outcomes = await asyncio.gather(
                *(client.connect() for client in clients.values()), return_exceptions=True
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            for client in clients.values():
                assert client.welcome is not None
                check_worker_limits(client.label, client.welcome, config, seq_len)
            log.info(
                "loading %s (embedding, head, %d of %d blocks) on %s",
                folder,
                len(local_blocks),
                config.n_layers,
                torch_device,
            )
            part = load_llama(
                folder,
                local_blocks,
                with_embedding=True,
                with_head=True,
                dtype=torch_dtype,
                device=torch_device,
                max_seq_len=seq_len,
                config=config,
                quantization=quantization,
            )
            log.info("master runs %s", describe_part(part))
        except BaseException:
            await asyncio.gather(*(client.close() for client in clients.values()))
            raise
        store = SessionStore(
            part,
            local_blocks,
            seq_len,
            kv_budget(kv_memory, torch_device),  # measured after loading the weights
            owner="the master",
        )
        if local_blocks:
            store.check_fits_one_session()
        stages: list[Stage] = [
            LocalStage(part, run.blocks, store, offload=offload)
            if run.node is None
            else RemoteStage(clients[run.node.name], run.blocks)
            for run in runs
        ]
        return cls(folder, config, tokenizer, part, stages, seq_len, offload, prefill_chunk, store)

    @classmethod
    async def from_options(cls, opts: dict[str, Any], offload: bool = False) -> Master:
        """`open` with the CLI's options (one list for the CLI and the HTTP API)."""
        return await cls.open(
            opts["model"],
            topology=opts["topology"],
            device=opts["device"],
            dtype=opts["dtype"],
            max_seq_len=opts["max_seq_len"],
            offload=offload,
            connect_timeout=opts["connect_timeout"],
            retry_timeout=opts["retry_timeout"],
            cluster_key=opts["cluster_key"],
            tls_ca=opts["tls_ca"],
            round_trip_per_block=opts.get("debug_round_trip_per_block", False),
            quantize=opts.get("quantize"),
            kv_memory=opts.get("kv_memory"),
            prefill_chunk=opts.get("prefill_chunk") or DEFAULT_PREFILL_CHUNK,
            liveness=LivenessSettings.for_heartbeat_timeout(opts["heartbeat_timeout"])
            if opts.get("heartbeat_timeout")
            else None,
        )

    def encode(self, prompt: str, system_prompt: str | None = None, raw: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, system_prompt, raw)

    async def forward_chunks(
        self, session_id: str, token_ids: Sequence[int], start_pos: int, stats: GenerationStats
    ) -> AsyncIterator[tuple[int, torch.Tensor]]:
        """Run tokens at start_pos.. through every stage, `prefill_chunk` positions at a time.

        Yields (start position, hidden states (1, T_chunk, C) after the last stage) per chunk,
        in order. Each chunk is a task: it enters stage i once the chunk before it has left
        stage i (a stage must see a session's positions in order), so chunk k+1 runs on the
        first stage while chunk k runs on the second.
        """
        size = self.prefill_chunk
        starts = range(0, len(token_ids), size)
        if len(starts) == 1:  # a decode step or a short prompt: no tasks, no events
            yield start_pos, await self._through_stages(session_id, token_ids, start_pos, stats)
            return
        if not self.pipeline_prefill:
            for offset in starts:
                chunk = token_ids[offset : offset + size]
                hidden = await self._through_stages(session_id, chunk, start_pos + offset, stats)
                yield start_pos + offset, hidden
            return
        left = [[asyncio.Event() for _ in starts] for _ in self.stages]  # [stage][chunk]
        tasks = [
            asyncio.create_task(
                self._through_stages(
                    session_id,
                    token_ids[offset : offset + size],
                    start_pos + offset,
                    stats,
                    (left, index),
                )
            )
            for index, offset in enumerate(starts)
        ]
        try:
            for offset, task in zip(starts, tasks, strict=True):
                yield start_pos + offset, await task
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _through_stages(
        self,
        session_id: str,
        token_ids: Sequence[int],
        start_pos: int,
        stats: GenerationStats,
        order: tuple[list[list[asyncio.Event]], int] | None = None,
    ) -> torch.Tensor:
        """Embed tokens and run them through every stage: hidden (1, T, C) after the last.

        order = (left, k) for chunk k of a pipelined prefill: left[i][k] is set when chunk k
        leaves stage i, and chunk k enters stage i only after left[i][k - 1].
        """
        tokens = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
        hidden = await self._local(self.model.embed, tokens)  # (1, T, C)
        for i, stage in enumerate(self.stages):
            if order is not None and order[1]:
                await order[0][i][order[1] - 1].wait()
            times = stats.stages.setdefault(stage.label, StageTimes())
            hidden = await stage.forward(session_id, hidden, start_pos, times)
            if order is not None:
                order[0][i][order[1]].set()
        return hidden

    async def _logits(
        self, session_id: str, token_ids: Sequence[int], start_pos: int, stats: GenerationStats
    ) -> torch.Tensor:
        """Run tokens at start_pos.. through every stage; logits (vocab,) of the last one."""
        last: torch.Tensor | None = None
        async for _, hidden in self.forward_chunks(session_id, token_ids, start_pos, stats):
            last = hidden
        assert last is not None, "no tokens to run"
        logits = await self._local(self.model.head, last[:, -1:])  # only the last is sampled
        return logits[0, -1]

    async def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (1, T, C) after the last stage -> float32 logits (1, T, vocab)."""
        return await self._local(self.model.head, hidden)

    async def close_session(self, session_id: str) -> None:
        """Free a session's KV caches on every stage (here and on the workers)."""
        for stage in self.stages:
            await stage.close_session(session_id)

    async def _local(self, fn: Any, *args: Any) -> torch.Tensor:
        def run() -> torch.Tensor:
            with torch.inference_mode():
                return fn(*args)

        return await asyncio.to_thread(run) if self.offload else run()

    async def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        max_new_tokens: int,
        ignore_eos: bool = False,
        stats: GenerationStats | None = None,
    ) -> AsyncIterator[int]:
        """Yield new token ids (stop tokens are not yielded) until EOS or a length limit."""
        stats = stats if stats is not None else GenerationStats()
        if not prompt_ids:
            raise ContextError("the prompt is empty")
        if len(prompt_ids) >= self.max_seq_len:
            raise ContextError(
                f"the prompt has {len(prompt_ids)} tokens, but the context holds "
                f"{self.max_seq_len}; shorten it or raise --max-seq-len "
                f"(the model allows up to {self.config.max_position_embeddings})"
            )
        session_id = uuid.uuid4().hex
        scheduler = self.scheduler
        next_logits = scheduler.logits if scheduler is not None else self._logits
        if scheduler is not None:
            scheduler.join(session_id)
        sampler = Sampler(params)
        history = list(prompt_ids)
        stats.prompt_tokens = len(prompt_ids)
        stats.finish_reason = "length"
        try:
            started = time.perf_counter()
            logits = await next_logits(session_id, prompt_ids, 0, stats)
            stats.prefill_s = time.perf_counter() - started
            started = time.perf_counter()
            while stats.new_tokens < max_new_tokens:
                if self.offload:  # the HTTP API: other requests' events go on meanwhile
                    token = await asyncio.to_thread(sampler, logits, history)
                else:
                    token = sampler(logits, history)
                if token in self.stop_ids and not ignore_eos:
                    stats.finish_reason = "stop"
                    break
                history.append(token)
                stats.new_tokens += 1
                yield token
                if stats.new_tokens >= max_new_tokens:
                    break
                if len(history) >= self.max_seq_len:
                    log.warning("context full (%d tokens): stopping", self.max_seq_len)
                    break
                logits = await next_logits(session_id, [token], len(history) - 1, stats)
                stats.decode_steps += 1
                stats.decode_s = time.perf_counter() - started
        finally:
            if scheduler is not None:
                await scheduler.leave(session_id)
            await self.close_session(session_id)

    async def close(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.close()
        for stage in self.stages:
            await stage.close()


def _runs(topology: str | Path | Topology | None, n_layers: int) -> list[Run]:
    """The model's contiguous runs in block order; all on the master without a topology."""
    if topology is None:
        return [Run(node=None, start=0, stop=n_layers)]
    if isinstance(topology, Topology):  # a measured plan (cake/cluster_setup.py)
        return topology.runs(n_layers)
    return load_topology(topology).runs(n_layers)


def _one_per_block(run: Run) -> list[Run]:
    if run.node is None:
        return [run]
    return [Run(run.node, block, block + 1) for block in run.blocks]
