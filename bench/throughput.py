"""One model through every configuration: open them all, warm up, alternate rounds, summarise."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bench.machine import load_average
from bench.models import ModelSpec, bytes_per_token
from bench.runs import CakeRunner, Measurement, Runner, TransformersRunner, alternate, warm_up
from bench.stats import ratios, spread
from bench.worker_memory import worker_rows

log = logging.getLogger("bench")

TRANSFORMERS, LOCAL = "transformers", "cake local"


@dataclass(frozen=True)
class RunSettings:
    rounds: int
    tokens: int  # decode steps timed per generation
    prompt_tokens: int
    threads: int
    worker_counts: tuple[int, ...] = (2, 3)
    seed: int = 0

    @property
    def max_seq_len(self) -> int:
        """The context every KV cache holds: the prompt and the generation, rounded up."""
        needed = self.prompt_tokens + self.tokens + 1
        return -(-needed // 256) * 256


def random_prompt(spec: ModelSpec, settings: RunSettings) -> list[int]:
    """Random token ids: no tokenizer or chat template in the timed path, same ids everywhere."""
    generator = torch.Generator().manual_seed(settings.seed)
    vocab = spec.config["vocab_size"]
    return torch.randint(0, vocab, (settings.prompt_tokens,), generator=generator).tolist()


async def open_runners(spec: ModelSpec, settings: RunSettings) -> list[Runner]:
    runners: list[Runner] = []
    try:
        log.info("%s: loading transformers", spec.title)
        runners.append(TransformersRunner(spec))
        log.info("%s: loading cake local", spec.title)
        runners.append(await CakeRunner.local(spec, settings.max_seq_len))
        for n_workers in settings.worker_counts:
            runners.append(
                await CakeRunner.loopback(spec, n_workers, settings.max_seq_len, settings.threads)
            )
    except BaseException:
        await close_runners(runners)
        raise
    return runners


async def close_runners(runners: Sequence[Runner]) -> None:
    for runner in runners:
        await runner.close()


async def measure_model(spec: ModelSpec, settings: RunSettings, idle_rss: int) -> dict:
    prompt = random_prompt(spec, settings)
    runners = await open_runners(spec, settings)
    try:
        await warm_up(runners, prompt)
        load_start = load_average()
        measured = await alternate(runners, prompt, settings.tokens, settings.rounds)
        load_end = load_average()
        memory = [
            row
            for runner in runners
            if isinstance(runner, CakeRunner) and runner.workers
            for row in worker_rows(spec, runner, idle_rss, settings.max_seq_len)
        ]
    finally:
        await close_runners(runners)
    return {
        "title": spec.title,
        "folder": str(spec.folder),
        "dtype": spec.dtype,
        "n_layers": spec.config["num_hidden_layers"],
        "hidden_size": spec.config["hidden_size"],
        "bytes_per_token": bytes_per_token(spec),
        "max_seq_len": settings.max_seq_len,
        "load_average": {"start": load_start, "end": load_end},
        "configs": summarise(measured),
        "memory": memory,
    }


def summarise(measured: dict[str, list[Measurement]]) -> dict[str, dict]:
    """Per configuration: spreads of tok/s, and ratios to its baseline round by round.

    The baseline of cake local is transformers; that of the distributed configurations is
    cake local (what splitting costs), with their ratio to transformers given too.
    """
    reference_tokens = measured[TRANSFORMERS][0].tokens
    summary = {}
    for label, runs in measured.items():
        baseline = None if label == TRANSFORMERS else TRANSFORMERS if label == LOCAL else LOCAL
        entry = {
            "baseline": baseline,
            "decode_tok_s": spread([m.decode_tok_s for m in runs]),
            "prefill_tok_s": spread([m.prefill_tok_s for m in runs]),
            "round_trips_per_token": runs[-1].round_trips_per_token,
            "wire_ms_per_token": spread([m.wire_ms_per_token for m in runs]),
            "same_tokens_as_transformers": all(m.tokens == reference_tokens for m in runs),
            "rounds": [
                {"decode_tok_s": m.decode_tok_s, "prefill_tok_s": m.prefill_tok_s} for m in runs
            ],
        }
        for name, reference in (("baseline", baseline), ("transformers", TRANSFORMERS)):
            if reference is None or reference == label:
                continue
            base = measured[reference]
            entry[f"decode_vs_{name}"] = ratios(
                [m.decode_tok_s for m in runs], [m.decode_tok_s for m in base]
            )
            entry[f"prefill_vs_{name}"] = ratios(
                [m.prefill_tok_s for m in runs], [m.prefill_tok_s for m in base]
            )
        summary[label] = entry
    return summary
