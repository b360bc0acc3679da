"""cake's benchmark: decode vs transformers as users run both, loopback workers, thread policy,
per-hop cost, weight layout, in-process prefill and worker memory.

    .venv/bin/python -m bench.bench            # full run (30-45 minutes on 2 cores)
    .venv/bin/python -m bench.bench --quick    # smoke run: SmolLM2 only, fewer rounds/tokens
    sudo .venv/bin/python -m bench.bench --netns   # also: workers behind veth + netem links

Progress goes to stderr, the markdown report to stdout; both the report and the raw numbers
are written to --out (bench/results/: latest.md, latest.json, decode_tok_s.png). A full run
also copies latest.md and the chart to docs/bench/, which is tracked. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from types import FrameType

import torch

from bench.goals import evaluate
from bench.hop import measure_hop
from bench.layout import measure_layout
from bench.machine import cpu_features, cpu_model, load_average, machine_info, read_bandwidth
from bench.models import MODEL_KEYS, SMOLLM2, default_cache_dir, resolve_model
from bench.netns import measure_netns
from bench.report import write
from bench.streamed import measure_streamed
from bench.throughput import RunSettings, measure_model
from bench.worker_hop import measure_worker_hop
from bench.worker_memory import idle_torch_rss

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results"
DEFAULT_DOCS = ROOT / "docs" / "bench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench",
        description="cake's benchmark; the markdown report goes to stdout, progress to stderr.",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: SmolLM2 only, 2 rounds")
    parser.add_argument(
        "--models",
        default=None,
        help=f"comma-separated, from {', '.join(MODEL_KEYS)} (default: all; --quick: smollm2)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="default 5 (--quick: 2)")
    parser.add_argument("--tokens", type=int, default=None, help="decode steps; 64 (--quick: 16)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument(
        "--streamed-tokens",
        type=int,
        default=None,
        help="new tokens per separate-process run; 128 (--quick: 32)",
    )
    parser.add_argument("--streamed-rounds", type=int, default=None, help="default 3 (--quick: 1)")
    parser.add_argument(
        "--no-policies",
        action="store_true",
        help="separate processes: skip the forced --thread-wait spin/sleep configurations",
    )
    parser.add_argument(
        "--no-in-process",
        action="store_true",
        help="skip the in-process tables (prefill, round trips, worker memory)",
    )
    parser.add_argument("--hop-trips", type=int, default=None, help="default 2000 (--quick: 500)")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads everywhere"
    )
    parser.add_argument("--netns", action="store_true", help="also run workers in namespaces")
    parser.add_argument("--netns-rtt-ms", type=float, default=1.0, help="0: no netem delay")
    parser.add_argument("--netns-rate", default="1gbit")
    parser.add_argument(
        "--netns-model", default=SMOLLM2, choices=MODEL_KEYS, help="the model --netns runs"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--docs",
        default=str(DEFAULT_DOCS),
        help="where latest.md and the chart are copied (not with --quick); '' for nowhere",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=default_cache_dir(),
        help="where the Llama-3.2-1B-shaped model is built (once)",
    )
    options = parser.parse_args(argv)
    quick = options.quick
    options.models = (options.models or (SMOLLM2 if quick else ",".join(MODEL_KEYS))).split(",")
    unknown = sorted(set(options.models) - set(MODEL_KEYS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODEL_KEYS)}")
    options.rounds = options.rounds or (2 if quick else 5)
    options.tokens = options.tokens or (16 if quick else 64)
    options.hop_trips = options.hop_trips or (500 if quick else 2000)
    options.streamed_tokens = options.streamed_tokens or (32 if quick else 128)
    options.streamed_rounds = options.streamed_rounds or (1 if quick else 3)
    options.docs = Path(options.docs) if options.docs and not quick else None
    return options


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt where the main thread is, so that every
    finally (and atexit) stops what it started. For SIGINT this replaces asyncio.run's
    task cancellation, which Python 3.11's wait_for can swallow (mid-connect, say)."""
    raise KeyboardInterrupt(f"signal {signum}")


def run(options: argparse.Namespace) -> dict:
    torch.set_num_threads(options.threads)
    settings = RunSettings(
        rounds=options.rounds,
        tokens=options.tokens,
        prompt_tokens=options.prompt_tokens,
        threads=options.threads,
    )
    results: dict = {
        "machine": machine_info(options.threads),
        "settings": {
            "rounds": settings.rounds,
            "tokens": settings.tokens,
            "prompt_tokens": settings.prompt_tokens,
            "max_seq_len": settings.max_seq_len,
            "quick": options.quick,
            "command": " ".join(["python -m bench.bench", *sys.argv[1:]]),
        },
    }
    log.info("memory bandwidth")
    results["bandwidth"] = read_bandwidth()
    log.info("idle `import torch` RSS")
    results["idle_torch_rss"] = idle_torch_rss()
    results["streamed"] = {}
    for key in options.models:
        spec = resolve_model(key, options.cache_dir)
        log.info("== %s, separate processes: %s", spec.title, spec.folder)
        results["streamed"][key] = measure_streamed(
            spec.folder,
            spec.title,
            spec.dtype,
            tokens=options.streamed_tokens,
            rounds=options.streamed_rounds,
            policies=not options.no_policies,
        )
    results["hop"] = measure_hop(options.hop_trips)
    results["worker_hop"] = measure_worker_hop(options.hop_trips // 2)
    log.info("weight layouts")
    results["layout"] = measure_layout(20 if options.quick else 50)
    results["models"] = {}
    for key in [] if options.no_in_process else options.models:
        spec = resolve_model(key, options.cache_dir)
        log.info("== %s: %s", spec.title, spec.folder)
        results["models"][key] = asyncio.run(
            measure_model(spec, settings, results["idle_torch_rss"])
        )
    if options.netns:
        spec = resolve_model(options.netns_model, options.cache_dir)
        log.info("== netns: %s", spec.title)
        results["netns"] = asyncio.run(
            measure_netns(spec, settings, options.netns_rtt_ms, options.netns_rate)
        )
    results["machine"]["load_average_end"] = load_average()
    results["goals"] = evaluate(results)
    return results


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="[%(asctime)s %(name)s] %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("cake", "transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        results = run(options)
    except KeyboardInterrupt:
        sys.exit("interrupted: workers stopped, namespaces removed")
    text = write(results, options.out, options.docs)
    if options.docs is not None:  # one page per CPU the benchmark has met
        slug = "-".join([cpu_model(), *cpu_features(), f"{results['machine']['cores']}c"])
        slug = "".join(c if c.isalnum() else "-" for c in slug.lower()).strip("-")
        (options.docs / f"cpu-{slug}.md").write_text(text, encoding="utf-8")
    log.info("wrote %s%s", options.out, f" and {options.docs}" if options.docs else "")
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
