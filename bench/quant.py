"""Quantized weights: decode speed and peak memory of f32, bf16, int8, int4, GGUF, llama.cpp.

    python -m bench.quant [--models smollm2,llama-1b-shape] [--tokens 64] [--threads 2]
                          [--node-llama-dir DIR]

Every configuration runs in its own process (so its peak RSS is its own): load the model
locally, prefill a short raw prompt, then time `--tokens` greedy decode steps. Reported per
configuration: decode tok/s, the ratio to the f32 default of the same model in the same run,
peak RSS, the RSS right after imports (the import baseline), the bytes of weights one decode
step reads, and the fraction of the measured memory bandwidth that reading them at that speed
takes (bytes per token x tok/s / bandwidth). llama.cpp (node-llama-cpp's prebuilt CPU binary,
benchmark only: `npm install --prefix DIR node-llama-cpp@3.21.1`) runs the same GGUF files
with the same thread count.

Models: SmolLM2-135M (its GGUF dequantized to f32 once for the float rows; the demo GGUF
itself, Q4_1/Q8_0), and the Llama-3.2-1B shape with random weights (bench.models' bf16 folder
for the float/--quantize rows; a Q4_0 GGUF written by bench.gguf_writer for the GGUF rows).
Writes bench/results/quant.json and quant.md; prints the markdown to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("bench")
RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "The history of the city begins with a small settlement on the river, where"
MIB = 1 << 20


# --- the child: one configuration, one process -------------------------------------------------


def _status(field: str) -> int:
    """A /proc/self/status field in bytes. (VmHWM, not getrusage's ru_maxrss: Linux carries
    ru_maxrss across exec, so a child would report its parent's peak.)"""
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def run_child(model: str, dtype: str, quantize: str | None, tokens: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from cake.decoding.sampling import SamplingParams
    from cake.decoding.stats import GenerationStats
    from cake.master import Master, MasterSettings
    from cake.model.linear import QuantizedLinear

    baseline = _status("VmRSS")
    started = time.perf_counter()
    master = asyncio.run(
        Master.open(
            MasterSettings(model, device="cpu", dtype=dtype, max_seq_len=512, quantize=quantize)
        )
    )
    load_s = time.perf_counter() - started
    part = master.ends
    embedding = part.model.embed_tokens
    # What one decode step streams: every block's weights and the head (an untied embedding is
    # read one row per token).
    streamed = sum(
        t.numel() * t.element_size()
        for name, t in [*part.named_parameters(), *part.named_buffers()]
        if embedding is None or not name.startswith("model.embed_tokens")
    )
    kinds = sorted({type(m).__name__ for m in part.modules() if isinstance(m, QuantizedLinear)})
    ids = master.encode(PROMPT, raw=True)
    stats = GenerationStats()

    async def generate() -> None:
        params = SamplingParams(temperature=0)
        async for _ in master.generate(ids, params, tokens + 1, True, stats):
            pass

    asyncio.run(generate())
    peak = _status("VmHWM")
    asyncio.run(master.close())
    return {
        "decode_tok_s": stats.decode_tok_s,
        "load_s": load_s,
        "peak_rss_bytes": peak,
        "import_rss_bytes": baseline,
        "bytes_per_token": streamed,
        "quantized_modules": kinds,
    }


# --- the parent ---------------------------------------------------------------------------------


def child(model: Path, dtype: str, quantize: str | None, tokens: int, threads: int) -> dict:
    command = [sys.executable, "-m", "bench.quant", "--child", str(model), "--dtype", dtype,
               "--tokens", str(tokens), "--threads", str(threads)]  # fmt: skip
    if quantize:
        command += ["--quantize", quantize]
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def llama_cpp(node_dir: Path, gguf: Path, tokens: int, threads: int) -> dict | None:
    script = Path(__file__).resolve().parent / "llamacpp_decode.mjs"
    if not (node_dir / "node_modules" / "node-llama-cpp").is_dir():
        log.warning("no node-llama-cpp in %s: llama.cpp rows skipped", node_dir)
        return None
    command = ["node", str(script), str(node_dir), str(gguf), str(tokens + 1), str(threads),
               PROMPT]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        log.warning("llama.cpp failed on %s: %s", gguf, done.stderr[-2000:])
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def configurations(models: list[str], cache_dir: Path) -> list[tuple[str, str, dict]]:
    """(model title, configuration label, how to run it) in run order; f32 first per model."""
    from bench.gguf_writer import write_random_q4_0_gguf
    from bench.models import LLAMA_1B_SHAPE, SMOLLM2, resolve_model
    from bench.split_memory import CONFIG as LLAMA_1B_CONFIG
    from cake.model.demo import demo_gguf

    plans = []
    for key in models:
        spec = resolve_model(key, cache_dir)
        if key == SMOLLM2:
            title, gguf = "SmolLM2-135M", demo_gguf()
        elif key == LLAMA_1B_SHAPE:
            title, gguf = "Llama-3.2-1B shape", cache_dir.parent / "llama-1b-shape-q4_0.gguf"
            if not gguf.is_file():
                log.info("writing %s (random Q4_0, once)", gguf)
                write_random_q4_0_gguf(gguf, LLAMA_1B_CONFIG)
        else:
            raise SystemExit(f"unknown model {key!r}")
        plans += [
            (title, "f32 (default)", {"model": spec.folder, "dtype": "f32"}),
            (title, "bf16", {"model": spec.folder, "dtype": "bf16"}),
            (title, "--quantize int8", {"model": spec.folder, "dtype": "auto", "quantize": "int8"}),
            (title, "--quantize int4", {"model": spec.folder, "dtype": "auto", "quantize": "int4"}),
            (title, f"GGUF native ({gguf.name})", {"model": gguf, "dtype": "auto", "gguf": True}),
            (title, f"llama.cpp ({gguf.name})", {"llama_cpp": gguf}),
        ]
    return plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2,llama-1b-shape")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--node-llama-dir", type=Path, default=Path("/tmp/nodellama"))
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--quantize", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
        result = run_child(args.child, args.dtype, args.quantize, args.tokens, args.threads)
        print(json.dumps(result))
        return
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="[bench] %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    from bench.machine import machine_info, read_bandwidth
    from bench.models import default_cache_dir

    cache_dir = args.cache_dir or default_cache_dir()
    machine = machine_info(args.threads)
    bandwidth = read_bandwidth()["bytes_per_s"]
    log.info("memory read bandwidth: %.1f GB/s", bandwidth / 1e9)
    rows = []
    for title, label, how in configurations(args.models.split(","), cache_dir):
        log.info("%s: %s", title, label)
        if "llama_cpp" in how:
            result = llama_cpp(args.node_llama_dir, how["llama_cpp"], args.tokens, args.threads)
            if result is None:
                continue
            result["bytes_per_token"] = how["llama_cpp"].stat().st_size
        else:
            result = child(how["model"], how["dtype"], how.get("quantize"), args.tokens,
                           args.threads)  # fmt: skip
        result.update(model=title, config=label)
        if how.get("gguf") or "llama_cpp" in how:
            result["file_bytes"] = Path(how.get("model") or how["llama_cpp"]).stat().st_size
        rows.append(result)
    report = {"machine": machine, "bandwidth_bytes_per_s": bandwidth, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quant.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    markdown = render(report)
    (RESULTS / "quant.md").write_text(markdown)
    print(markdown)


def render(report: dict) -> str:
    bandwidth = report["bandwidth_bytes_per_s"]
    machine = report["machine"]
    lines = [
        f"Machine: {machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}; "
        f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s; load average at start "
        f"{machine['load_average_start']}.",
        "",
        "| model | configuration | decode tok/s | vs f32 | peak RSS MiB | import RSS MiB | "
        "weights read/token MiB | of bandwidth |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    base: dict[str, float] = {}
    for row in report["rows"]:
        if row["config"].startswith("f32"):
            base[row["model"]] = row["decode_tok_s"]
        ratio = row["decode_tok_s"] / base[row["model"]] if base.get(row["model"]) else 0.0
        fraction = row["bytes_per_token"] * row["decode_tok_s"] / bandwidth
        imported = row.get("import_rss_bytes")
        lines.append(
            f"| {row['model']} | {row['config']} | {row['decode_tok_s']:.1f} | {ratio:.2f}x | "
            f"{row['peak_rss_bytes'] / MIB:.0f} | "
            + (f"{imported / MIB:.0f}" if imported else "-")
            + f" | {row['bytes_per_token'] / MIB:.0f} | {fraction:.0%} |"
        )
    lines += ["", *goals(report["rows"])]
    return "\n".join(lines) + "\n"


def goals(rows: list[dict]) -> list[str]:
    """The issue's goals, each with its measured value."""
    by = {(r["model"], r["config"].split(" (")[0]): r for r in rows}
    out = []
    one_b = "Llama-3.2-1B shape"
    f32 = by.get((one_b, "f32"))
    for scheme, goal in (("int8", 2.0), ("int4", 1.5)):
        row = by.get((one_b, f"--quantize {scheme}"))
        if f32 and row:
            ratio = row["decode_tok_s"] / f32["decode_tok_s"]
            verdict = "met" if ratio >= goal else "NOT met"
            out.append(f"- 1B {scheme} decode {ratio:.2f}x f32 (goal >= {goal}x): {verdict}")
    native, cpp = by.get((one_b, "GGUF native")), by.get((one_b, "llama.cpp"))
    if native and cpp:
        ratio = native["decode_tok_s"] / cpp["decode_tok_s"]
        verdict = "met" if ratio >= 0.5 else "NOT met"
        out.append(f"- 1B Q4_0 GGUF: {ratio:.2f}x llama.cpp's decode (goal >= 0.5x): {verdict}")
    demo = by.get(("SmolLM2-135M", "GGUF native"))
    if demo:
        limit = demo["import_rss_bytes"] + 1.3 * demo["file_bytes"] + 150 * MIB
        verdict = "met" if demo["peak_rss_bytes"] <= limit else "NOT met"
        out.append(
            f"- demo GGUF peak RSS {demo['peak_rss_bytes'] / MIB:.0f} MiB (goal <= import "
            f"{demo['import_rss_bytes'] / MIB:.0f} + 1.3 x file {demo['file_bytes'] / MIB:.0f} "
            f"+ 150 = {limit / MIB:.0f} MiB): {verdict}"
        )
    return out


if __name__ == "__main__":
    main()
