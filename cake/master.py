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

from cake.decoding.draft import Drafter, DraftModel, LookupDrafter, load_draft_model
from cake.decoding.sampling import Sampler, SamplingParams
from cake.decoding.scheduler import DEFAULT_PREFILL_CHUNK as BATCH_PREFILL_CHUNK
from cake.decoding.scheduler import StepScheduler
from cake.decoding.speculative import (
    DraftController,
    DraftSettings,
    Speculation,
    parse_draft_tokens,
)
from cake.engine.remote_stage import RemoteStage
from cake.engine.replan import Replanning, ResumableSteps
from cake.engine.sessions import SessionStore
from cake.engine.stage_builder import (
    LocalPart,
    StageSettings,
    build_stages,
    connect_workers,
    load_local_part,
    missing_blocks,
)
from cake.engine.stages import Stage, StageTimes
from cake.errors import ContextError, StagesReplaced, WorkerError, WorkerGone
from cake.host.devices import resolve_device
from cake.model.config import LlamaConfig, architecture_of
from cake.model.gguf import resolve_model_path
from cake.model.llama import Llama
from cake.model.loader import activation_dtype, describe_part
from cake.model.quant import Quantization
from cake.model.tokenizer import encode_prompt, load_tokenizer, stop_token_ids
from cake.topology import Run, Topology, format_blocks, load_topology
from cake.wire.auth import client_tls
from cake.wire.auth import cluster_key as parse_cluster_key
from cake.wire.liveness import LivenessSettings
from cake.wire.protocol import fingerprint_config, session_frame_limit
from cake.wire.worker_link import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_RETRY_TIMEOUT_S

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LEN = 4096
DEFAULT_PREFILL_CHUNK = 512  # positions per prefill request (--prefill-chunk)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0  # decode forwards (one round trip per remote stage each)
    decode_tokens: int = 0  # tokens those forwards chose (more than one each with drafting)
    drafted: int = 0  # speculative decoding: tokens proposed by the drafter ...
    accepted: int = 0  # ... and accepted by the model
    drafted_ahead: int = 0  # rounds whose draft was made during the previous round's trips
    finish_reason: str = ""  # "stop" (an EOS token) or "length" (sample length or context)
    stages: dict[str, StageTimes] = field(default_factory=dict)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def round_trips(self) -> int:
        return sum(t.round_trips for t in self.stages.values())

    def summary(self) -> str:
        line = (
            f"prompt tokens: {self.prompt_tokens}, new tokens: {self.new_tokens}, "
            f"prefill: {self.prefill_tok_s:.1f} tok/s, decode: {self.decode_tok_s:.1f} tok/s"
        )
        tokens = self.decode_tokens + 1 if self.prompt_tokens else 0
        if self.round_trips and tokens:
            line += f", round trips/token: {self.round_trips / tokens:.2f}"
        if self.drafted:
            line += (
                f", drafted: {self.drafted}, accepted: {self.accepted} "
                f"({self.accepted / self.drafted:.0%}), tokens/round trip: "
                f"{self.decode_tokens / max(self.decode_steps, 1):.2f}"
            )
        return line

    def stage_lines(self) -> list[str]:
        steps = max(self.decode_tokens + 1, 1)
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
        draft: DraftSettings | None = None,
        draft_model: DraftModel | None = None,
        stage_settings: StageSettings | None = None,
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
        self.draft = draft or DraftSettings()  # what generate drafts with unless told otherwise
        self.draft_model = draft_model
        # With several sessions at once (the HTTP API), their steps are batched; a single CLI
        # generation runs its steps directly.
        self.scheduler: StepScheduler | None = None
        self.stage_settings = stage_settings  # to build stages again after a re-plan
        self.parts = [LocalPart(model, store)] if store is not None else []
        # Set for a cluster the master planned itself (--workers, --discover): a worker lost
        # for good is then planned around (cake/engine/replan.py) instead of failing the sessions.
        self.replanning: Replanning | None = None

    def enable_batching(self, groups: int = 1, prefill_chunk: int | None = None) -> StepScheduler:
        """Batch the steps of concurrent generations (see cake/decoding/scheduler.py). A prompt goes in
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

    @property
    def stage_epoch(self) -> int:
        """Counts re-plans: a session whose stages are older re-runs its history first."""
        return self.replanning.epoch if self.replanning is not None else 0

    async def retire_stages(self) -> None:
        """Stop every stage (a re-plan follows): requests in flight end with StagesReplaced,
        worker connections close, the master's own caches are freed."""
        for stage in self.stages:
            if isinstance(stage, RemoteStage):
                await stage.retire()
            else:
                await stage.close()

    async def use_topology(self, topology: Topology) -> None:
        """Build and connect the stages of a new plan (loading blocks the master now runs)."""
        assert self.stage_settings is not None, "the master was not opened with Master.open"
        runs = _runs(topology, self.config.n_layers)
        clients = await connect_workers(runs, self.config, self.stage_settings)
        missing = missing_blocks(runs, self.parts)
        if missing:
            try:
                part = await asyncio.to_thread(
                    load_local_part, self.folder, self.config, missing, self.stage_settings
                )
            except BaseException:
                await asyncio.gather(*(client.close() for client in clients.values()))
                raise
            self.parts.append(part)
        self.stages = build_stages(runs, clients, self.parts, self.offload)
        if self.scheduler is not None:
            self.scheduler.stages = list(self.stages)

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
        draft: str | None = None,
        draft_tokens: str | int | None = None,
    ) -> Master:
        """Load the master's part of the model, connect to the workers, build the stages."""
        draft_settings = DraftSettings(
            mode="none" if draft is None else "lookup" if draft == "lookup" else "model",
            tokens=parse_draft_tokens(draft_tokens),
        )
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
        settings = StageSettings(
            fingerprint=fingerprint_config(architecture_of(config)),
            max_seq_len=seq_len,
            max_frame_bytes=session_frame_limit(config.hidden_size, seq_len),
            connect_timeout=connect_timeout,
            retry_timeout=retry_timeout,
            cluster_key=parse_cluster_key(cluster_key),
            tls=client_tls(tls_ca),
            liveness=liveness,
            offload=offload,
            device=torch_device,
            dtype=torch_dtype,
            quantization=quantization,
            kv_memory=kv_memory,
        )
        # Workers first: an unreachable or mismatched worker fails in seconds, before a
        # possibly long load of the master's part.
        clients = await connect_workers(runs, config, settings)
        try:
            log.info(
                "loading %s (embedding, head, %d of %d blocks) on %s",
                folder,
                len(local_blocks),
                config.n_layers,
                torch_device,
            )
            part = settings.load(folder, config, local_blocks, with_ends=True)
            log.info("master runs %s", describe_part(part))
            draft_model = (
                load_draft_model(
                    draft, tokenizer, config.vocab_size, torch_device, torch_dtype, seq_len
                )
                if draft_settings.mode == "model"
                else None
            )
        except BaseException:
            await asyncio.gather(*(client.close() for client in clients.values()))
            raise
        store = settings.store(part, local_blocks)
        if local_blocks:
            store.check_fits_one_session()
        stages = build_stages(runs, clients, [LocalPart(part, store)], offload)
        return cls(
            folder,
            config,
            tokenizer,
            part,
            stages,
            seq_len,
            offload,
            prefill_chunk,
            store,
            draft_settings,
            draft_model,
            settings,
        )

    @classmethod
    async def from_options(cls, opts: dict[str, Any], offload: bool = False) -> Master:
        """`open` with the CLI's options (one list for the CLI and the HTTP API)."""
        master = await cls.open(
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
            draft=opts.get("draft"),
            draft_tokens=opts.get("draft_tokens"),
        )
        master.replanning = opts.get("replanning")  # set by --workers / --discover
        return master

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
        self,
        session_id: str,
        token_ids: Sequence[int],
        start_pos: int,
        stats: GenerationStats,
        every_position: bool = False,
    ) -> torch.Tensor:
        """Run tokens at start_pos.. through every stage (in chunks, see forward_chunks);
        logits (vocab,) of the last one, or (T, vocab) of each with `every_position` (to verify
        drafted tokens)."""
        hiddens: list[torch.Tensor] = []
        async for _, hidden in self.forward_chunks(session_id, token_ids, start_pos, stats):
            hiddens.append(hidden if every_position else hidden[:, -1:])
            if not every_position:
                hiddens = hiddens[-1:]
        assert hiddens, "no tokens to run"
        if every_position:
            hidden = hiddens[0] if len(hiddens) == 1 else torch.cat(hiddens, dim=1)
            return (await self._local(self.model.head, hidden))[0]  # (T, vocab)
        logits = await self._local(self.model.head, hiddens[-1])  # only the last is sampled
        return logits[0, -1]

    async def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (1, T, C) after the last stage -> float32 logits (1, T, vocab)."""
        return await self._local(self.model.head, hidden)

    async def close_session(self, session_id: str) -> None:
        """Free a session's KV caches on every stage (here and on the workers)."""
        for stage in self.stages:
            await stage.close_session(session_id)

    def _speculation(self, settings: DraftSettings) -> Speculation | None:
        if settings.mode == "none":
            return None
        if settings.mode == "lookup":
            drafter: Drafter = LookupDrafter()
        elif self.draft_model is not None:
            drafter = self.draft_model.drafter()
        else:
            raise ValueError("no draft model is loaded: start with --draft PATH, or use lookup")
        offload = self.offload and settings.mode == "model"  # lookup is too cheap for a thread
        # Drafting the next round during this one's round trips pays where there are round
        # trips; with every block here it would only compete with the verification for cores.
        remote = any(isinstance(stage, RemoteStage) for stage in self.stages)
        draft_ahead = settings.mode == "model" and remote
        return Speculation(drafter, DraftController(settings.tokens), offload, draft_ahead)

    async def _sample(self, sampler: Sampler, logits: torch.Tensor, history: list[int]) -> int:
        if self.offload:  # the HTTP API: other requests' events go on meanwhile
            return await asyncio.to_thread(sampler, logits, history)
        return sampler(logits, history)

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
        draft: DraftSettings | None = None,
    ) -> AsyncIterator[int]:
        """Yield new token ids (stop tokens are not yielded) until EOS or a length limit.

        `draft` (default: the master's) turns on speculative decoding: same greedy text, same
        sampling distribution, fewer round trips (see cake/decoding/speculative.py).
        """
        stats = stats if stats is not None else GenerationStats()
        speculation = self._speculation(draft or self.draft)
        if not prompt_ids:
            raise ContextError("the prompt is empty")
        if len(prompt_ids) >= self.max_seq_len:
            raise ContextError(
                f"the prompt has {len(prompt_ids)} tokens, but the context holds "
                f"{self.max_seq_len}; shorten it or raise --max-seq-len "
                f"(the model allows up to {self.config.max_position_embeddings})"
            )
        session_id = uuid.uuid4().hex
        # A drafting session verifies several positions per step, which batched steps do not
        # carry: it runs its own steps beside the batch.
        scheduler = self.scheduler if speculation is None else None
        next_logits = scheduler.logits if scheduler is not None else self._logits
        if scheduler is not None:
            scheduler.join(session_id)
        sampler = Sampler(params)
        history = list(prompt_ids)
        stats.prompt_tokens = len(prompt_ids)
        stats.finish_reason = "length"
        steps = ResumableSteps(self, session_id, history, next_logits, stats)
        try:
            started = time.perf_counter()
            logits = await steps.step(prompt_ids, 0)
            stats.prefill_s = time.perf_counter() - started
            if speculation is not None:
                speculation.controller.observe_prefill(len(prompt_ids), stats.prefill_s)
            started = time.perf_counter()
            chosen = [await self._sample(sampler, logits, history)]  # not yet yielded
            while chosen and stats.new_tokens < max_new_tokens:
                token = chosen.pop(0)
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
                if chosen:  # accepted drafts: already in every stage's caches
                    continue
                if speculation is not None and not steps.stale:
                    budget = min(
                        max_new_tokens - stats.new_tokens - 1, self.max_seq_len - len(history)
                    )
                    verifier = _SessionVerifier(self, session_id, stats)
                    try:
                        chosen = await speculation.round(verifier, history, sampler, budget, stats)
                        steps.ran(len(chosen))  # history[-1] and the accepted drafts
                    except (WorkerGone, StagesReplaced) as exc:
                        await steps.recover(exc)  # then a plain step, on the new stages
                if speculation is None or not chosen:
                    logits = await steps.step([token], len(history) - 1)
                    chosen = [await self._sample(sampler, logits, history)]
                stats.decode_steps += 1
                stats.decode_tokens += len(chosen)
                stats.decode_s = time.perf_counter() - started
        finally:
            if scheduler is not None:
                await scheduler.leave(session_id)
            await self.close_session(session_id)

    async def recover(self, cause: WorkerError, epoch: int) -> None:
        """A step on the stages of `epoch` failed for good: re-plan (or re-raise `cause`
        when this master has no plan of its own: a hand-written topology)."""
        if self.replanning is None:
            raise cause
        await self.replanning.recover(self, cause, epoch)

    async def close(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.close()
        for stage in self.stages:
            await stage.close()


class _SessionVerifier:
    """What a speculation round needs from the master, for one session."""

    def __init__(self, master: Master, session_id: str, stats: GenerationStats) -> None:
        self.master, self.session_id, self.stats = master, session_id, stats

    async def forward(self, tokens: Sequence[int], start_pos: int) -> torch.Tensor:
        return await self.master._logits(
            self.session_id, tokens, start_pos, self.stats, every_position=True
        )

    async def rollback(self, length: int) -> None:
        for stage in self.master.stages:
            await stage.rollback(self.session_id, length)


def _runs(topology: str | Path | Topology | None, n_layers: int) -> list[Run]:
    """The model's contiguous runs in block order; all on the master without a topology."""
    if topology is None:
        return [Run(node=None, start=0, stop=n_layers)]
    if isinstance(topology, Topology):  # a measured plan (cake/cluster/setup.py)
        return topology.runs(n_layers)
    return load_topology(topology).runs(n_layers)


def _one_per_block(run: Run) -> list[Run]:
    if run.node is None:
        return [run]
    return [Run(run.node, block, block + 1) for block in run.blocks]
