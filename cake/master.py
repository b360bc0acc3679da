"""The master: the model's ends (embedding, head, sampler), its stages, and generation.

`Master.open(settings)` is the opener: it opens the model (cake/model/opener.py), connects the
workers the topology names and loads what the master runs itself (cake/engine/stage_builder.py),
and wires the three parts every caller then uses:

    pipeline    the stages in block order, a step through them, re-planning
                (cake/engine/pipeline.py)
    scheduler   the one path to the model: every session's positions, batched into steps
                (cake/engine/scheduler.py)
    generator   the generate loop: prefill, decode steps, speculative rounds
                (cake/decoding/generate.py)

The CLI, the HTTP API, the terminal chat and perplexity all go through the same scheduler; they
differ only in the settings (`MasterSettings`): the API offloads the master's tensor work to a
thread and cuts long prompts into steps of `step_positions`, so that concurrent requests share
steps without one prompt stalling the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cake.decoding.draft import DraftModel, load_draft_model
from cake.decoding.generate import Generator
from cake.decoding.grammar import GrammarSpec
from cake.decoding.perplexity import DEFAULT_WINDOW, Perplexity, perplexity
from cake.decoding.sampling import SamplingParams
from cake.decoding.speculative import DraftSettings
from cake.decoding.stats import GenerationStats
from cake.engine.compute import MasterCompute
from cake.engine.pipeline import Pipeline, Replanning
from cake.engine.prefix_cache import PrefixCache
from cake.engine.scheduler import DEFAULT_STEP_POSITIONS, StepScheduler
from cake.engine.stage_builder import StageBuilder, StageSettings
from cake.engine.stages import StageHealth
from cake.model.config import LlamaConfig, architecture_of
from cake.model.llama import Llama
from cake.model.loader import describe_kernels, describe_part
from cake.model.opener import Compute, OpenedModel, open_model
from cake.model.tokenizer import encode_prompt, stop_token_ids
from cake.topology import Run, Topology, format_blocks, load_topology
from cake.wire.auth import client_tls
from cake.wire.auth import cluster_key as parse_cluster_key
from cake.wire.liveness import LivenessSettings
from cake.wire.protocol import fingerprint_config, session_frame_limit
from cake.wire.worker_link import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_RETRY_TIMEOUT_S

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 512  # positions per micro-batch through the stages (--prefill-chunk)


@dataclass(frozen=True)
class MasterSettings:
    """Everything a master is opened with: the CLI's options, typed."""

    model: str | Path
    topology: str | Path | Topology | None = None  # None: every block on the master
    device: str = "auto"
    dtype: str = "auto"
    max_seq_len: int | None = None
    quantize: str | None = None
    kv_memory: str | None = None
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S
    retry_timeout: float = DEFAULT_RETRY_TIMEOUT_S
    liveness: LivenessSettings | None = None  # --heartbeat-timeout
    cluster_key: str | None = None
    tls_ca: str | None = None
    draft: str | None = None  # --draft: "lookup" or a draft model's path
    draft_tokens: str | int | None = None
    round_trip_per_block: bool = False  # benchmarks: shows what one trip per run saves
    replanning: Replanning | None = None  # set for a cluster the master planned itself
    # Serving many sessions at once (the HTTP API):
    offload: bool = False  # the master's tensor work on a thread, the event loop free
    batching: bool = True  # concurrent sessions share steps
    batch_groups: int | None = None  # groups stepping on their own; None: one per remote stage
    step_positions: int | None = None  # most prompt positions of one session per step
    prefix_cache: bool = True  # keep finished sessions to reuse their prefix (--no-prefix-cache)

    @classmethod
    def serving(cls, **options: Any) -> MasterSettings:
        """Settings for many concurrent sessions (the HTTP API): tensor work off the event
        loop, prompts in steps of at most DEFAULT_STEP_POSITIONS (and --prefill-chunk)."""
        chunk = options.get("prefill_chunk", DEFAULT_PREFILL_CHUNK)
        options.setdefault("step_positions", min(chunk, DEFAULT_STEP_POSITIONS))
        return cls(offload=True, **options)


class Master:
    """One model, served by local and remote stages; each generation is its own session."""

    def __init__(
        self,
        model: OpenedModel,
        compute: Compute,
        tokenizer: Any,
        ends: Llama,
        pipeline: Pipeline,
        scheduler: StepScheduler,
        generator: Generator,
    ) -> None:
        self.opened = model
        self.compute = compute
        self.tokenizer = tokenizer
        self.ends = ends  # embedding, head, and any block no worker serves
        self.pipeline = pipeline
        self.scheduler = scheduler
        self.generator = generator

    @property
    def name(self) -> str:
        """The model's name as the user gave it: the folder's, or the .gguf file's."""
        return self.opened.name

    @property
    def config(self) -> LlamaConfig:
        return self.opened.config

    @property
    def max_seq_len(self) -> int:
        return self.compute.max_seq_len

    @property
    def stop_ids(self) -> frozenset[int]:
        return self.generator.stop_ids

    @property
    def drafting(self) -> DraftSettings:
        """What a generation drafts with unless it asks otherwise (--draft, --draft-tokens)."""
        return self.generator.drafting

    @property
    def draft_model(self) -> DraftModel | None:
        return self.generator.draft_model

    @classmethod
    async def open(cls, settings: MasterSettings) -> Master:
        """Open the model, connect the workers, load the master's part, wire the parts."""
        drafting = DraftSettings.from_options(settings.draft, settings.draft_tokens)
        model = open_model(settings.model)
        # The tokenizer (transformers' import alone is seconds) loads on a thread of its own
        # while the workers are connected and the master's weights load.
        tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="cake-tokenizer")
        tokenizing = tokenizer_thread.submit(model.tokenizer)
        tokenizer_thread.shutdown(wait=False)
        try:
            return await cls._open(settings, model, tokenizing, drafting)
        except BaseException:
            # Nothing is left running behind a failed open (no later than the old order, which
            # loaded the tokenizer before anything else).
            if not tokenizing.cancel():
                with contextlib.suppress(BaseException):
                    await asyncio.wrap_future(tokenizing)
            raise

    @classmethod
    async def _open(
        cls,
        settings: MasterSettings,
        model: OpenedModel,
        tokenizing: Future[Any],
        drafting: DraftSettings,
    ) -> Master:
        config = model.config
        compute = model.compute(
            settings.device, settings.dtype, settings.quantize, settings.max_seq_len
        )
        runs = _runs(settings.topology, config.n_layers, settings.round_trip_per_block)
        local_blocks = [b for run in runs if run.node is None for b in run.blocks]
        if settings.topology is not None and local_blocks:
            log.info(
                "no worker lists blocks %s: they run on the master", format_blocks(local_blocks)
            )
        master_compute = MasterCompute(settings.offload)
        builder = StageBuilder(_stage_settings(settings, model, compute), master_compute)
        draft_model: DraftModel | None = None

        def load_master(blocks: list[int]) -> Llama:
            nonlocal draft_model
            log.info(
                "loading %s (embedding, head, %d of %d blocks) on %s",
                model.folder,
                len(blocks),
                config.n_layers,
                compute.device,
            )
            part = model.load(compute, blocks, with_ends=True)
            log.info("master runs %s", describe_part(part))
            if drafting.mode == "model":
                assert settings.draft is not None
                draft_model = load_draft_model(
                    settings.draft, tokenizing.result(), config.vocab_size, compute
                )
            return part

        stages = await builder.build(runs, load_master)
        ends = builder.parts[0].model
        pipeline = Pipeline(stages, builder, settings.replanning, settings.prefill_chunk)
        try:
            tokenizer = await asyncio.wrap_future(tokenizing)
        except BaseException:
            await pipeline.close()
            raise
        scheduler = StepScheduler(
            ends.embed,
            ends.head,
            pipeline,
            master_compute,
            compute.device,
            groups=settings.batch_groups or max(pipeline.remote_stages, 1),
            batching=settings.batching,
            step_positions=settings.step_positions,
        )
        generator = Generator(
            scheduler,
            stop_token_ids(model.folder, config, tokenizer),
            compute.max_seq_len,
            config.max_position_embeddings,
            master_compute,
            drafting,
            draft_model,
            tokenizer,
            PrefixCache() if settings.prefix_cache else None,
        )
        return cls(model, compute, tokenizer, ends, pipeline, scheduler, generator)

    def encode(self, prompt: str, system_prompt: str | None = None, raw: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, system_prompt, raw)

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        max_new_tokens: int,
        ignore_eos: bool = False,
        stats: GenerationStats | None = None,
        draft: DraftSettings | None = None,
        *,
        grammar: GrammarSpec | None = None,
        logprobs: int | None = None,
    ) -> AsyncIterator[int]:
        """New token ids as they are chosen (see Generator.generate)."""
        return self.generator.generate(
            prompt_ids,
            params,
            max_new_tokens,
            ignore_eos,
            stats,
            draft,
            grammar=grammar,
            logprobs=logprobs,
        )

    async def perplexity(
        self, token_ids: Sequence[int], window: int = DEFAULT_WINDOW
    ) -> Perplexity:
        """Perplexity of `token_ids` (a text tokenized as --raw prompts are: `encode(text,
        raw=True)`) in windows of at most `window` tokens."""
        log.info("%d tokens, windows of %d", len(token_ids), min(window, self.max_seq_len))
        return await perplexity(
            self.scheduler, self.head_logits, token_ids, self.max_seq_len, window
        )

    async def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (1, T, C) after the last stage -> float32 logits (1, T, vocab)."""
        return await self.scheduler.run_local(self.ends.head, hidden)

    async def health(self) -> list[StageHealth]:
        """Every stage and whether it can serve now."""
        return await self.pipeline.health()

    def expert_load(self) -> dict[str, list[int]]:
        """Stage label -> rows each expert of its mixture-of-experts blocks took since this
        master started (stages with dense blocks left out)."""
        found: dict[str, list[int]] = {}
        for stage in self.pipeline.stages:
            load = stage.expert_load()
            if load:
                old = found.get(stage.label, [0] * len(load))
                found[stage.label] = [a + b for a, b in zip(old, load, strict=True)]
        return found

    def local_kernels(self) -> str:
        """The kernels this process's quantized weights run ('' when all are float)."""
        return describe_kernels(self.ends)

    async def close(self) -> None:
        await self.scheduler.close()
        await self.pipeline.close()


def _stage_settings(
    settings: MasterSettings, model: OpenedModel, compute: Compute
) -> StageSettings:
    return StageSettings(
        model=model,
        compute=compute,
        fingerprint=fingerprint_config(architecture_of(model.config)),
        max_frame_bytes=session_frame_limit(model.config.hidden_size, compute.max_seq_len),
        connect_timeout=settings.connect_timeout,
        retry_timeout=settings.retry_timeout,
        cluster_key=parse_cluster_key(settings.cluster_key),
        tls=client_tls(settings.tls_ca),
        liveness=settings.liveness,
        kv_memory=settings.kv_memory,
    )


def _runs(topology: str | Path | Topology | None, n_layers: int, per_block: bool) -> list[Run]:
    """The model's contiguous runs in block order (all on the master without a topology);
    `per_block`: a run per block (the benchmark of what one trip per run saves)."""
    if topology is None:
        return [Run(node=None, start=0, stop=n_layers)]
    if not isinstance(topology, Topology):  # a measured plan is one already
        topology = load_topology(topology)
    runs = topology.runs(n_layers)
    if not per_block:
        return runs
    split: list[Run] = []
    for run in runs:
        if run.node is None:
            split.append(run)
        else:
            split.extend(Run(run.node, block, block + 1) for block in run.blocks)
    return split
