"""Issue 24's start-up measurement: process start to the first streamed token, cold and warm.

    python -m bench.startup [--rounds 3] [--models 1b,demo]

Each model is started as `cake-cli --model FILE --prompt hi --raw -n 1 --temperature 0`, a fresh
process each time, and timed from the process's start to the first byte on its stdout (the
first token). Per round and model, in this order:
- cold: no packed weights in the cache (the folder emptied): the first start (Q4_0/Q4_1
  blocks run where they lie in the file, nothing to convert; other types are converted, packed
  and written to the cache);
- warm: the second start, which maps what the cold one wrote;
- off: `--no-weight-cache`, every start converting what is not run as stored.
The kernel choices and the GGUF's metadata folder are in the cache for all three (measured and
written by one untimed start first), so the rounds time the weights and nothing else changes.
The bench's cache is its own (`<cache>/bench/startup-cache`), never the user's.

Models: `1b`, a Llama-3.2-1B-shaped Q4_0 GGUF with random weights (0.7 GB, written once into the
cake cache by bench.gguf_writer); `8b`, the Llama-3-8B shape (4.5 GB; only when named);
`demo`, SmolLM2-135M-Instruct Q4_1 (cake/model/demo.py). Prints the markdown table (the fastest
of --rounds per column, the rounds alternating the three, and their ratios), and where
node-llama-cpp is installed (`npm install --prefix /tmp/nodellama node-llama-cpp@3.21.1`)
llama.cpp on the same file in the same rounds (process start to its first output byte, written
after its first token), the issue's yardstick; writes bench/results/startup.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.gguf_writer import LLAMA_3_8B, write_random_q4_0_gguf
from bench.machine import cpu_label, machine_info, write_result
from cake.host.cache import cache_root
from cake.model.demo import demo_gguf

LLAMA_3_2_1B = {
    **LLAMA_3_8B,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "tie_word_embeddings": True,
    "max_position_embeddings": 131072,
}
SHAPES = {
    "1b": ("llama-3.2-1b-shape-q4_0.gguf", LLAMA_3_2_1B),
    "8b": ("llama-3-8b-shape-q4_0.gguf", LLAMA_3_8B),
}
KINDS = ("cold", "warm", "off")


def model_file(name: str) -> Path:
    """The GGUF file of a model name (random-weight shapes written once)."""
    if name == "demo":
        return demo_gguf()
    file_name, config = SHAPES[name]
    path = cache_root() / "bench" / file_name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} (once)", file=sys.stderr)
        write_random_q4_0_gguf(path, config)
    return path


def first_token_seconds(model: Path, cache: Path, *flags: str) -> float:
    """Seconds from starting `cake-cli` to the first byte of its output (the first token)."""
    # --raw: the prompt as llama.cpp's run below takes it (one token, no chat template).
    command = [sys.executable, "-m", "cake.cli", "--model", str(model), "--prompt", "hi", "--raw"]
    command += ["-n", "1", "--temperature", "0", *flags]
    env = {**os.environ, "CAKE_CACHE_DIR": str(cache)}
    env.pop("CAKE_NO_WEIGHT_CACHE", None)
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=log)
        assert process.stdout is not None
        first = process.stdout.read(1)
        seconds = time.perf_counter() - start
        process.stdout.read()
        if process.wait() != 0 or not first:
            log.seek(0)
            raise SystemExit(f"{' '.join(command)} failed:\n{log.read().decode()[-3000:]}")
    return seconds


def llama_cpp_seconds(model: Path, node_dir: Path) -> float | None:
    """Seconds from starting llama.cpp (node-llama-cpp's prebuilt CPU build, via
    bench/llamacpp_decode.mjs: load, one prompt token, one new token) to its first output
    byte, which it writes after the first token; None without node-llama-cpp in `node_dir`."""
    if not (node_dir / "node_modules" / "node-llama-cpp").is_dir():
        return None
    script = Path(__file__).resolve().parent / "llamacpp_decode.mjs"
    command = ["node", str(script), str(node_dir), str(model), "1", "2", "hi"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout is not None
    first = process.stdout.read(1)
    seconds = time.perf_counter() - start
    process.stdout.read()
    if process.wait() != 0 or not first:
        raise SystemExit(f"{' '.join(command)} failed")
    return seconds


def measure(model: Path, rounds: int, node_dir: Path) -> dict[str, float]:
    cache = cache_root() / "bench" / "startup-cache"
    first_token_seconds(model, cache, "--no-weight-cache")  # kernel choices, metadata folder
    best = dict.fromkeys(KINDS, float("inf"))
    for _ in range(rounds):
        shutil.rmtree(cache / "weights", ignore_errors=True)
        times = {kind: first_token_seconds(model, cache, *flags) for kind, flags in (
            ("cold", ()), ("warm", ()), ("off", ("--no-weight-cache",)))}  # fmt: skip
        llama = llama_cpp_seconds(model, node_dir)
        if llama is not None:
            times["llama_cpp"] = llama
        for kind, seconds in times.items():
            best[kind] = min(best.get(kind, float("inf")), seconds)
    ratios = {f"warm_over_{kind}": best["warm"] / best[kind] for kind in ("cold", "off")}
    if "llama_cpp" in best:
        ratios |= {f"{kind}_over_llama_cpp": best[kind] / best["llama_cpp"] for kind in KINDS}
    return {**best, **ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="1b,demo", help="comma-separated: 1b, 8b, demo")
    parser.add_argument(
        "--node-llama-dir",
        type=Path,
        default=Path("/tmp/nodellama"),
        help="where `npm install --prefix DIR node-llama-cpp@3.21.1` put llama.cpp (benchmark "
        "only; without it the llama.cpp column is left out)",
    )
    args = parser.parse_args()
    rows = {}
    for name in args.models.split(","):
        path = model_file(name)
        measured = measure(path, args.rounds, args.node_llama_dir)
        rows[name] = {"file": path.name, "bytes": path.stat().st_size, **measured}
    machine = machine_info(torch.get_num_threads())
    lines = [
        f"Machine: {cpu_label(machine)}, torch {machine['torch']}. Process start to the first "
        "streamed token of `cake-cli --model FILE --prompt hi --raw -n 1 --temperature 0`, "
        f"fastest of {args.rounds} rounds (load average at start {machine['load_average_start']}).",
        "",
        "| model | file | cold (first start) | warm (second start) | --no-weight-cache "
        "| warm / cold | warm / off |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['file']} ({row['bytes'] / 2**30:.2f} GiB) | {row['cold']:.1f} s "
            f"| {row['warm']:.1f} s | {row['off']:.1f} s | {row['warm_over_cold']:.2f} "
            f"| {row['warm_over_off']:.2f} |"
        )
    compared = {name: row for name, row in rows.items() if "llama_cpp" in row}
    if compared:
        lines += [
            "",
            "| model | llama.cpp | cake cold / llama.cpp | cake warm / llama.cpp |",
            "|---|---|---|---|",
        ]
        for name, row in compared.items():
            lines.append(
                f"| {name} | {row['llama_cpp']:.1f} s | {row['cold_over_llama_cpp']:.2f}x "
                f"| {row['warm_over_llama_cpp']:.2f}x |"
            )
    print("\n".join(lines))
    write_result("startup", {"machine": machine, "args": vars(args), "rows": rows}, indent=1)


if __name__ == "__main__":
    main()
