"""Issue 21's measurements: each kernel on its own, then cake against llama.cpp end to end.

    python -m bench.kernels [--threads 2] [--tokens 64] [--node-llama-dir /tmp/nodellama]
                            [--skip-matvec] [--skip-models]

1. One matrix-vector product (decode) and one 128-row product (prefill) per kernel candidate,
   on the Llama-3.2-1B shapes 2048->8192 and 8192->2048: GB/s of weight bytes read (decode),
   GFLOP/s (prefill). Dense f32 and bf16 `F.linear` for scale.
2. End to end, every configuration in its own process, same files, same threads, one run:
   decode tok/s after a short prompt and prefill tok/s of ~700 tokens of prose, for cake with
   the measured kernels (`auto`), cake with torch's kernels (`--kernels torch`, what cake ran
   before issue 21), and llama.cpp (node-llama-cpp 3.21.1's prebuilt CPU build, benchmark only:
   `npm install --prefix DIR node-llama-cpp@3.21.1`) on: the demo GGUF (SmolLM2-135M Q4_1), a
   Llama-3.2-1B-shaped Q4_0 GGUF (random weights), and the 1B shape with `--quantize int4` and
   `--quantize int8` (int4 vs int8 decode).

Writes bench/results/kernels.json and kernels.md (the CPU named at the top); prints the markdown.
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
PROSE = Path(__file__).resolve().parent.parent / "tests" / "data" / "prose.txt"
SHORT_PROMPT = "The history of the city begins with a small settlement on the river, where"
SHAPES = ((8192, 2048), (2048, 8192))  # (out, in): gate/up-like and down-like
PREFILL_ROWS = 128


def long_prompt() -> str:
    """~700 tokens of prose (the test prose, 563 SmolLM2 tokens, and its first quarter again)."""
    text = PROSE.read_text(encoding="utf-8")
    return text + "\n\n" + text[: len(text) // 4]


# --- 1. kernels on their own -------------------------------------------------------------------


def best_seconds(run, repeats: int = 12) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def matvec_rows(threads: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from cake.model.kernels.candidates import KERNELS
    from cake.model.kernels.probe import probe_input, probe_weight

    torch.set_num_threads(threads)
    rows = []
    for out, cols in SHAPES:
        x1, xp = probe_input(1, cols, 1), probe_input(PREFILL_ROWS, cols, 2)
        flops = 2 * PREFILL_ROWS * out * cols
        for dtype in (torch.float32, torch.bfloat16):
            w = torch.randn(out, cols).to(dtype)
            a, b = x1.to(dtype), xp.to(dtype)
            rows.append({
                "kernel": f"dense {str(dtype).removeprefix('torch.')}", "format": "float",
                "shape": f"{cols}->{out}", "weight_bytes": w.numel() * w.element_size(),
                "decode_s": best_seconds(lambda w=w, a=a: F.linear(a, w)),
                "prefill_s": best_seconds(lambda w=w, b=b: F.linear(b, w), 4), "flops": flops,
            })  # fmt: skip
        for scheme in ("int4", "int8"):
            weight = probe_weight(scheme, (out, cols), 32)
            for kernel in KERNELS:
                if kernel.scheme != scheme or kernel.device_type != "cpu":
                    continue
                why = kernel.unusable((out, cols), weight.group_size)
                if why is not None:
                    log.info("%s %s: %s", kernel.name, scheme, why)
                    continue
                packed = kernel.pack(weight, torch.device("cpu"))
                rows.append({
                    "kernel": kernel.name, "format": weight.describe(), "shape": f"{cols}->{out}",
                    "weight_bytes": weight.nbytes,
                    "decode_s": best_seconds(lambda k=kernel, p=packed, x=x1: k.run(p, x)),
                    "prefill_s": best_seconds(lambda k=kernel, p=packed, x=xp: k.run(p, x), 4),
                    "flops": flops,
                })  # fmt: skip
    return rows


# --- 2. end to end ------------------------------------------------------------------------------


def run_child(model: str, dtype: str, quantize: str | None, kernels: str, tokens: int) -> dict:
    import torch

    from cake.decoding.sampling import SamplingParams
    from cake.decoding.stats import GenerationStats
    from cake.master import Master, MasterSettings
    from cake.model.kernels import probe
    from cake.model.loader import describe_part

    probe.use(kernels)
    settings = MasterSettings(model, device="cpu", dtype=dtype, max_seq_len=1024, quantize=quantize)
    master = asyncio.run(Master.open(settings))

    def generate(prompt: str, new_tokens: int) -> GenerationStats:
        stats = GenerationStats()

        async def run() -> None:
            ids = master.encode(prompt, raw=True)
            async for _ in master.generate(
                ids, SamplingParams(temperature=0), new_tokens, True, stats
            ):
                pass

        asyncio.run(run())
        return stats

    generate(SHORT_PROMPT, 4)  # warm-up
    decode = generate(SHORT_PROMPT, tokens + 1)
    prefill = generate(long_prompt(), 1)
    result = {
        "decode_tok_s": decode.decode_tok_s,
        "prefill_tok_s": prefill.prefill_tok_s,
        "prompt_tokens": prefill.prompt_tokens,
        "kernels": describe_part(master.ends),
        "threads": torch.get_num_threads(),
    }
    asyncio.run(master.close())
    return result


def cake(
    model: Path, dtype: str, quantize: str | None, kernels: str, tokens: int, threads: int
) -> dict:
    from cake.host.threads import choose_wait_policy

    command = [sys.executable, "-m", "bench.kernels", "--child", str(model), "--dtype", dtype,
               "--kernels", kernels, "--tokens", str(tokens)]  # fmt: skip
    if quantize:
        command += ["--quantize", quantize]
    policy = choose_wait_policy("auto", mode="master")  # as cake-cli decides it
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if policy.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = policy.omp_wait_policy
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wait": policy.wait}


def llama_cpp(node_dir: Path, gguf: Path, tokens: int, threads: int) -> dict | None:
    script = Path(__file__).resolve().parent / "llamacpp_decode.mjs"
    if not (node_dir / "node_modules" / "node-llama-cpp").is_dir():
        log.warning("no node-llama-cpp in %s: llama.cpp rows skipped", node_dir)
        return None

    def one(prompt: str, count: int) -> dict:
        command = ["node", str(script), str(node_dir), str(gguf), str(count), str(threads),
                   prompt, "2048"]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"llama.cpp failed on {gguf}: {done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    decode, prefill = one(SHORT_PROMPT, tokens + 1), one(long_prompt(), 1)
    return {
        "decode_tok_s": decode["decode_tok_s"],
        "prefill_tok_s": prefill["prompt_tokens"] / prefill["prefill_s"],
        "prompt_tokens": prefill["prompt_tokens"],
    }


def model_rows(args: argparse.Namespace) -> list[dict]:
    from bench.gguf_writer import write_random_q4_0_gguf
    from bench.models import LLAMA_1B_SHAPE, default_cache_dir, resolve_model
    from bench.split_memory import CONFIG as LLAMA_1B_CONFIG
    from cake.model.demo import demo_gguf

    one_b = resolve_model(LLAMA_1B_SHAPE, default_cache_dir())
    q4_0 = default_cache_dir().parent / "llama-1b-shape-q4_0.gguf"
    if not q4_0.is_file():
        write_random_q4_0_gguf(q4_0, LLAMA_1B_CONFIG)
    rows = []
    for title, gguf in (
        ("SmolLM2-135M Q4_1 (demo GGUF)", demo_gguf()),
        ("Llama-3.2-1B shape Q4_0 GGUF", q4_0),
    ):
        for label, kernels in (
            ("cake, measured kernels", "auto"),
            ("cake, torch's kernels", "torch"),
        ):
            log.info("%s: %s", title, label)
            rows.append(
                {
                    "model": title,
                    "run": label,
                    **cake(gguf, "auto", None, kernels, args.tokens, args.threads),
                }
            )
        log.info("%s: llama.cpp", title)
        result = llama_cpp(args.node_llama_dir, gguf, args.tokens, args.threads)
        if result:
            rows.append({"model": title, "run": "llama.cpp", **result})
    for scheme in ("int4", "int8"):
        for label, kernels in (("measured kernels", "auto"), ("torch's kernels", "torch")):
            log.info("1B --quantize %s: %s", scheme, label)
            run = cake(one_b.folder, "auto", scheme, kernels, args.tokens, args.threads)
            rows.append(
                {"model": f"Llama-3.2-1B shape --quantize {scheme}", "run": f"cake, {label}", **run}
            )
    return rows


# --- the report ---------------------------------------------------------------------------------


def report(machine: dict, matvec: list[dict], models: list[dict]) -> str:
    head = f"{machine['cpu']} ({machine['isa']}, {machine['threads']} threads)"
    lines = [f"# Kernels: {head}, torch {machine['torch']}", ""]
    if matvec:
        lines += [
            "## One product per kernel",
            "",
            "decode: 1 row, GB/s of weight bytes read; prefill: 128 rows, GFLOP/s",
            "",
            "| kernel | format | shape | decode GB/s | prefill GFLOP/s |",
            "|---|---|---|---|---|",
        ]
        for r in matvec:
            gbs = r["weight_bytes"] / r["decode_s"] / 1e9
            gflops = r["flops"] / r["prefill_s"] / 1e9
            lines.append(
                f"| {r['kernel']} | {r['format']} | {r['shape']} | {gbs:.1f} | {gflops:.0f} |"
            )
    if models:
        lines += [
            "",
            "## End to end (decode after a short prompt; prefill of ~700 tokens of prose)",
            "",
            "| model | run | decode tok/s | vs llama.cpp | prefill tok/s | vs llama.cpp "
            "| kernels |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in models:
            ref = next(
                (m for m in models if (m["model"], m["run"]) == (r["model"], "llama.cpp")), None
            )
            dec = f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}x" if ref else "-"
            pre = f"{r['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x" if ref else "-"
            lines.append(
                f"| {r['model']} | {r['run']} | {r['decode_tok_s']:.1f} | {dec} "
                f"| {r['prefill_tok_s']:.0f} | {pre} | {r.get('kernels', 'llama.cpp')} |"
            )
        by = {(r["model"], r["run"]): r for r in models}
        measured = "cake, measured kernels"
        i4 = by.get(("Llama-3.2-1B shape --quantize int4", measured))
        i8 = by.get(("Llama-3.2-1B shape --quantize int8", measured))
        if i4 and i8:
            ratio = i4["decode_tok_s"] / i8["decode_tok_s"]
            lines += ["", f"int4 decode / int8 decode, 1B shape, measured kernels: {ratio:.2f}x"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--node-llama-dir", type=Path, default=Path("/tmp/nodellama"))
    parser.add_argument("--skip-matvec", action="store_true")
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--quantize", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--kernels", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
        print(
            json.dumps(run_child(args.child, args.dtype, args.quantize, args.kernels, args.tokens))
        )
        return
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="[bench] %(message)s")
    import torch

    from cake.model.kernels.probe import cpu_model

    machine = {"cpu": cpu_model(), "isa": torch.backends.cpu.get_cpu_capability(),
               "threads": args.threads, "torch": torch.__version__}  # fmt: skip
    matvec = [] if args.skip_matvec else matvec_rows(args.threads)
    models = [] if args.skip_models else model_rows(args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kernels.json").write_text(
        json.dumps({"machine": machine, "matvec": matvec, "models": models}, indent=1)
    )
    text = report(machine, matvec, models)
    (RESULTS / "kernels.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
