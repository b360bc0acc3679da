"""The master: tokenizer, embedding, stages (local or remote), head, sampling, generation.

`Master.generate` is an async generator that yields token ids as they are chosen. It owns the
positions (`start_pos`) and passes them to every stage, so a stage never guesses where it is.
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
from cake.chat import encode_prompt, load_tokenizer, stop_token_ids
from cake.config import LlamaConfig, architecture_of
from cake.convert import resolve_model_path
from cake.devices import DTYPE_NAMES, resolve_device, resolve_dtype
from cake.draft import Drafter, DraftModel, LookupDrafter, load_draft_model
from cake.errors import ContextError
from cake.model import Llama
from cake.protocol import fingerprint_config
from cake.remote import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_RETRY_TIMEOUT_S,
    RemoteStage,
    WorkerClient,
)
from cake.sampling import Sampler, SamplingParams
from cake.speculative import DraftController, DraftSettings, Speculation, parse_draft_tokens
from cake.stages import LocalStage, Stage, StageTimes
from cake.topology import Run, format_blocks, load_topology
from cake.weights import load_llama

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LEN = 4096


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
        draft: DraftSettings | None = None,
        draft_model: DraftModel | None = None,
    ) -> None:
        self.folder = folder
        self.config = config
        self.tokenizer = tokenizer
        self.model = model  # embedding, head, and any block no worker serves
        self.stages = stages
        self.max_seq_len = max_seq_len
        self.stop_ids = stop_token_ids(folder, config, tokenizer)
        self.device = next(model.parameters()).device
        self.offload = offload  # run the master's own tensor work in a thread (HTTP API)
        self.draft = draft or DraftSettings()  # what generate drafts with unless told otherwise
        self.draft_model = draft_model

    @classmethod
    async def open(
        cls,
        model: str | Path,
        topology: str | Path | None = None,
        device: str = "auto",
        dtype: str = "auto",
        max_seq_len: int | None = None,
        offload: bool = False,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT_S,
        cluster_key: str | None = None,
        tls_ca: str | None = None,
        round_trip_per_block: bool = False,
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
        torch_dtype = resolve_dtype(dtype, torch_device)
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
            log.info(
                "loading %s (embedding, head, %d of %d blocks) on %s as %s",
                folder,
                len(local_blocks),
                config.n_layers,
                torch_device,
                DTYPE_NAMES[torch_dtype],
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
            )
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
        stages: list[Stage] = [
            LocalStage(part, run.blocks, seq_len, offload=offload)
            if run.node is None
            else RemoteStage(clients[run.node.name], run.blocks)
            for run in runs
        ]
        return cls(
            folder, config, tokenizer, part, stages, seq_len, offload, draft_settings, draft_model
        )

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
            draft=opts.get("draft"),
            draft_tokens=opts.get("draft_tokens"),
        )

    def encode(self, prompt: str, system_prompt: str | None = None, raw: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, system_prompt, raw)

    async def _logits(
        self,
        session_id: str,
        token_ids: Sequence[int],
        start_pos: int,
        stats: GenerationStats,
        every_position: bool = False,
    ) -> torch.Tensor:
        """Run tokens at start_pos.. through every stage; logits (vocab,) of the last one, or
        (T, vocab) of each with `every_position` (to verify drafted tokens)."""
        tokens = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
        hidden = await self._local(self.model.embed, tokens)  # (1, T, C)
        for stage in self.stages:
            times = stats.stages.setdefault(stage.label, StageTimes())
            hidden = await stage.forward(session_id, hidden, start_pos, times)
        if every_position:
            return (await self._local(self.model.head, hidden))[0]  # (T, vocab)
        logits = await self._local(self.model.head, hidden[:, -1:])  # only the last is sampled
        return logits[0, -1]

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
        sampling distribution, fewer round trips (see cake/speculative.py).
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
        sampler = Sampler(params)
        history = list(prompt_ids)
        stats.prompt_tokens = len(prompt_ids)
        stats.finish_reason = "length"
        try:
            started = time.perf_counter()
            logits = await self._logits(session_id, prompt_ids, 0, stats)
            stats.prefill_s = time.perf_counter() - started
            if speculation is not None:
                speculation.controller.observe_prefill(len(prompt_ids), stats.prefill_s)
            started = time.perf_counter()
            chosen = [sampler(logits, history)]  # tokens chosen, in order, not yet yielded
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
                if speculation is None:
                    logits = await self._logits(session_id, [token], len(history) - 1, stats)
                    chosen = [sampler(logits, history)]
                else:
                    budget = min(
                        max_new_tokens - stats.new_tokens - 1, self.max_seq_len - len(history)
                    )
                    verifier = _SessionVerifier(self, session_id, stats)
                    chosen = await speculation.round(verifier, history, sampler, budget, stats)
                stats.decode_steps += 1
                stats.decode_tokens += len(chosen)
                stats.decode_s = time.perf_counter() - started
        finally:
            for stage in self.stages:
                await stage.close_session(session_id)

    async def close(self) -> None:
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


def _runs(topology: str | Path | None, n_layers: int) -> list[Run]:
    """The model's contiguous runs in block order; all on the master without a topology."""
    if topology is None:
        return [Run(node=None, start=0, stop=n_layers)]
    return load_topology(topology).runs(n_layers)


def _one_per_block(run: Run) -> list[Run]:
    if run.node is None:
        return [run]
    return [Run(run.node, block, block + 1) for block in run.blocks]
