"""Session store and chunked prefill: what they cost and what they buy, as same-run ratios.

Two measurements:

* **decode**: greedy decode tok/s of a local master (no workers) with growing, paged KV caches
  (this tree) against preallocated ones (a baseline commit, extracted with `git archive` and
  run from its own folder), for SmolLM2-135M (f32) and a tiny random Llama. Each configuration
  runs in its own process, alternating, so both see the same machine.
* **prefill**: prefill tok/s of SmolLM2 over 2 loopback worker processes (blocks split evenly)
  for a long prompt: in one request per stage, in chunks one at a time, and in chunks that
  pipeline across the stages (chunk k+1 on the first worker while chunk k is on the second).

    .venv/bin/python -m bench.kv_sessions                      # both, ~5 minutes on 2 cores
    .venv/bin/python -m bench.kv_sessions --only prefill --rounds 2

Markdown to stdout, JSON to bench/results/kv_sessions.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger("bench")

BASELINE = "50c9c1f"  # the last commit with preallocated (torch.zeros at max-seq-len) caches
ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------- decode (child)


async def _decode_child(folder: str, prompt_tokens: int, steps: int, max_seq_len: int) -> None:
    import torch

    from cake.decoding.sampling import SamplingParams
    from cake.decoding.stats import GenerationStats
    from cake.master import Master, MasterSettings

    master = await Master.open(
        MasterSettings(folder, device="cpu", dtype="f32", max_seq_len=max_seq_len)
    )
    vocab = master.config.vocab_size
    prompt = torch.randint(0, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(0))
    rates = []
    try:
        for _ in range(3):  # the first is a warm-up
            stats = GenerationStats()
            greedy = SamplingParams(temperature=0)
            async for _token in master.generate(prompt.tolist(), greedy, steps + 1, True, stats):
                pass
            rates.append(stats.decode_tok_s)
    finally:
        await master.close()
    import cake

    print(json.dumps({"decode_tok_s": max(rates[1:]), "cake": cake.__file__}))


def _tiny_model(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import build_random_llama

    if not (folder / "config.json").is_file():
        build_random_llama(folder, tokenizer=True, max_positions=2048)
    return folder


def _extract(commit: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, "cake"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def decode(rounds: int, baseline: str, steps: int) -> list[dict]:
    from bench.models import SMOLLM2, default_cache_dir, resolve_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="cake-kv-bench-") as tmp:
        (Path(tmp) / "base").mkdir()
        (Path(tmp) / "run").mkdir()  # cwd of the children: `python -m` puts it first on sys.path
        trees = {"preallocated": _extract(baseline, Path(tmp) / "base"), "paged": ROOT}
        models = {
            "SmolLM2-135M": str(resolve_model(SMOLLM2, default_cache_dir()).folder),
            "tiny (4 blocks x 64)": str(_tiny_model(Path(tmp) / "tiny")),
        }
        for title, folder in models.items():
            rates: dict[str, list[float]] = {name: [] for name in trees}
            for index in range(rounds):
                order = list(trees) if index % 2 == 0 else list(reversed(trees))
                for name in order:
                    env = {**os.environ, "PYTHONPATH": str(trees[name])}
                    out = subprocess.run(
                        [sys.executable, "-m", "bench.kv_sessions", "--decode-child", folder,
                         "--steps", str(steps)],
                        env={**env, "PYTHONPATH": f"{trees[name]}:{ROOT}"},
                        cwd=Path(tmp) / "run", capture_output=True, text=True,
                    )  # fmt: skip
                    if out.returncode:
                        raise RuntimeError(f"{title} {name} failed:\n{out.stderr[-3000:]}")
                    child = json.loads(out.stdout.strip().splitlines()[-1])
                    assert child["cake"].startswith(str(trees[name])), (name, child["cake"])
                    rates[name].append(child["decode_tok_s"])
                    log.info("%s %s: %.1f tok/s", title, name, rates[name][-1])
            ratios = [p / b for p, b in zip(rates["paged"], rates["preallocated"], strict=True)]
            rows.append(
                {
                    "model": title,
                    "preallocated_tok_s": statistics.median(rates["preallocated"]),
                    "paged_tok_s": statistics.median(rates["paged"]),
                    "ratio_median": statistics.median(ratios),
                    "ratio_min": min(ratios),
                    "ratio_max": max(ratios),
                }
            )
    return rows


# ----------------------------------------------------------------------- micro


class PreallocatedCache:
    """The cache cake had before the session store: zeros for max_seq_len, written at positions."""

    def __init__(
        self, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype
    ) -> None:
        import torch

        self.k = torch.zeros(1, n_kv_heads, max_seq_len, head_dim, dtype=dtype)
        self.v = torch.zeros(1, n_kv_heads, max_seq_len, head_dim, dtype=dtype)

    def update(
        self, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = start_pos + k.shape[2]
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def micro(rounds: int, steps: int = 200) -> list[dict]:
    """One SmolLM2-shaped block (random weights, f32): decode steps at positions 512.., with a
    preallocated and a paged cache, alternating step by step, so both see the same machine."""
    import time

    import torch

    from cake.model.config import LlamaConfig
    from cake.model.kv_cache import KVCache
    from cake.model.llama import RotaryTables
    from cake.model.loader import random_part

    config = LlamaConfig.from_dict(
        {
            "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 1,
            "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
            "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 4096,
            "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        }
    )  # fmt: skip
    block = random_part(config, [0], torch.float32, torch.device("cpu")).model.layers["0"]
    rope = RotaryTables(config, 4096, torch.device("cpu"), torch.float32)
    start = 512
    prompt = torch.randn(1, start, config.hidden_size)
    rows = []
    for _ in range(rounds):
        caches = {
            "preallocated": PreallocatedCache(3, 4096, 64, torch.float32),
            "paged": KVCache(3, 64, torch.device("cpu"), torch.float32, 64, 4096),
        }
        times: dict[str, list[float]] = {name: [] for name in caches}
        with torch.inference_mode():
            for cache in caches.values():
                block(prompt, 0, cache, *rope.at(0, start))
            for step in range(steps):
                x = torch.randn(1, 1, config.hidden_size)
                for name, cache in caches.items():
                    began = time.perf_counter()
                    block(x, start + step, cache, *rope.at(start + step, 1))
                    times[name].append(time.perf_counter() - began)
        pre, paged = (statistics.median(times[n]) for n in ("preallocated", "paged"))
        rows.append({"preallocated_us": pre * 1e6, "paged_us": paged * 1e6, "ratio": pre / paged})
        log.info("block step: preallocated %.0f us, paged %.0f us", pre * 1e6, paged * 1e6)
    return rows


# ----------------------------------------------------------------------- prefill


async def prefill(rounds: int, prompt_tokens: int) -> list[dict]:
    import torch

    from bench.models import SMOLLM2, default_cache_dir, resolve_model
    from bench.runs import CakeRunner
    from cake.decoding.sampling import SamplingParams
    from cake.decoding.stats import GenerationStats

    spec = resolve_model(SMOLLM2, default_cache_dir())
    threads = torch.get_num_threads()
    runner = await CakeRunner.loopback(spec, 2, max_seq_len=4096, threads=threads)
    master = runner.master
    prompt = torch.randint(0, 49152, (prompt_tokens,), generator=torch.Generator().manual_seed(1))
    configs = {  # label -> (prefill_chunk, pipelined)
        "one request per stage": (prompt_tokens, False),
        "chunks of 512, one at a time": (512, False),
        "chunks of 512, pipelined": (512, True),
        "chunks of 256, pipelined": (256, True),
    }
    rates: dict[str, list[float]] = {label: [] for label in configs}
    greedy = SamplingParams(temperature=0)
    try:
        for index in range(rounds + 1):  # round 0 warms up
            order = list(configs) if index % 2 == 0 else list(reversed(configs))
            for label in order:
                master.pipeline.micro_batch, master.pipeline.overlap = configs[label]
                stats = GenerationStats()
                async for _ in master.generate(prompt.tolist(), greedy, 1, True, stats):
                    pass
                if index:
                    rates[label].append(stats.prefill_tok_s)
                    log.info("prefill %s: %.0f tok/s", label, stats.prefill_tok_s)
    finally:
        await runner.close()
    base = rates["one request per stage"]
    return [
        {
            "config": label,
            "prefill_tok_s": statistics.median(values),
            "ratio_median": statistics.median(v / b for v, b in zip(values, base, strict=True)),
        }
        for label, values in rates.items()
    ]


# ----------------------------------------------------------------------- report


def report(results: dict) -> str:
    lines = []
    if "decode" in results:
        lines += [
            "### Decode: paged, growing KV caches vs preallocated (local master, f32)",
            "",
            "| model | preallocated tok/s | paged tok/s | ratio (median, min-max) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {r['preallocated_tok_s']:.1f} | {r['paged_tok_s']:.1f} | "
            f"{r['ratio_median']:.3f} ({r['ratio_min']:.3f}-{r['ratio_max']:.3f}) |"
            for r in results["decode"]
        ]
        lines.append("")
    if "micro" in results:
        lines += [
            "### One SmolLM2-shaped block, decode steps at positions 512-711 (f32)",
            "",
            "| round | preallocated µs/step | paged µs/step | speed ratio paged/preallocated |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {i} | {r['preallocated_us']:.0f} | {r['paged_us']:.0f} | {r['ratio']:.3f} |"
            for i, r in enumerate(results["micro"], 1)
        ]
        lines.append("")
    if "prefill" in results:
        lines += [
            f"### Prefill of {results['prompt_tokens']} tokens, SmolLM2 over 2 loopback workers",
            "",
            "| how | prefill tok/s | vs one request per stage |",
            "|---|---|---|",
        ]
        lines += [
            f"| {r['config']} | {r['prefill_tok_s']:.0f} | {r['ratio_median']:.3f} |"
            for r in results["prefill"]
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["micro", "decode", "prefill"], default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed")
    parser.add_argument("--prompt-tokens", type=int, default=2048, help="prefill prompt")
    parser.add_argument("--baseline", default=BASELINE, help="commit with preallocated caches")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--decode-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.decode_child:
        asyncio.run(_decode_child(args.decode_child, 128, args.steps, 2048))
        return
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    results: dict = {"prompt_tokens": args.prompt_tokens, "baseline": args.baseline}
    if args.only in (None, "micro"):
        results["micro"] = micro(args.rounds)
    if args.only in (None, "decode"):
        results["decode"] = decode(args.rounds, args.baseline, args.steps)
    if args.only in (None, "prefill"):
        results["prefill"] = asyncio.run(prefill(args.rounds, args.prompt_tokens))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_sessions.json").write_text(json.dumps(results, indent=2))
    print(report(results))


if __name__ == "__main__":
    main()
