"""Issue 22's mission: a model in the exact Qwen3-30B-A3B shape (48 blocks of 128 experts, 8
routed) on this 24 GB machine, across a master and two workers, in 4 bits end to end.

    python -m bench.moe_mission [--tokens 16] [--threads 1]

The weights are random and written once straight as a Q4_0 GGUF (bench.gguf_writer, ~17 GB,
never in float; the experts in llama.cpp's 3-D tensors) into the cake cache. Worker w1 serves
blocks 0-23 and w2 blocks 24-47, each reading only its own blocks' bytes from the file; the
master holds the embedding and the head. The master generates `--tokens` greedy tokens from a
raw prompt with --stats (the expert load balance of each worker); the report is each process's
peak RSS (VmHWM) and the decode speed. Prints markdown, writes bench/results/moe-mission.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.gguf_writer import QWEN3_30B_A3B, write_random_qwen3moe_q4_0_gguf
from bench.mission import GIB, _report, peak_rss
from cake.cluster.local_cluster import start_local_cluster
from cake.host.cache import cache_root
from cake.model.gguf import resolve_model_path

log = logging.getLogger("bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="[moe-mission] %(message)s")
    gguf = cache_root() / "bench" / "qwen3-30b-a3b-shape-q4_0.gguf"
    if not gguf.is_file():
        gguf.parent.mkdir(parents=True, exist_ok=True)
        log.info("writing %s (random Q4_0, once; ~17 GB)", gguf)
        write_random_qwen3moe_q4_0_gguf(gguf, QWEN3_30B_A3B)
    log.info("config and tokenizer from the file's metadata (cached once)")
    resolve_model_path(gguf)
    with tempfile.TemporaryDirectory() as tmp:
        topology = Path(tmp) / "topology.yml"
        layers = {"w1": ["model.layers.0-23"], "w2": ["model.layers.24-47"]}
        extra = ("--device", "cpu", "--threads", str(args.threads), "--max-seq-len", "256")
        workers = start_local_cluster(gguf, layers, topology, extra=extra, timeout=3600)
        try:
            command = [
                sys.executable, "-m", "cake.cli", "--model", str(gguf), "--topology",
                str(topology), "--raw", "--prompt", "The mission of this machine is",
                "-n", str(args.tokens), "--temperature", "0", "--ignore-eos", "--device", "cpu",
                "--threads", str(args.threads), "--max-seq-len", "256", "--stats",
            ]  # fmt: skip
            master = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            _, rusage = os.wait4(master.pid, 0)[1:]
            stdout, stderr = master.stdout.read(), master.stderr.read()  # type: ignore[union-attr]
            worker_peaks = {w.name: peak_rss(w.proc.pid) for w in workers}
        finally:
            for worker in workers:
                worker.stop()
    experts = [line for line in stderr.splitlines() if line.startswith("experts on ")]
    report = _report(
        "moe-mission.json", gguf, rusage.ru_maxrss, worker_peaks, stdout, stderr, experts=experts
    )
    total = report["master_peak_rss_bytes"] + sum(worker_peaks.values())
    print(
        f"Qwen3-30B-A3B shape, Q4_0 GGUF {report['file_bytes'] / GIB:.2f} GiB, master + 2 workers\n"
    )
    print("| process | peak RSS GiB |\n|---|---:|")
    print(f"| master (embedding, head) | {report['master_peak_rss_bytes'] / GIB:.2f} |")
    for name, peak in worker_peaks.items():
        print(f"| {name} (24 blocks of 128 experts, int4) | {peak / GIB:.2f} |")
    print(f"| all three | {total / GIB:.2f} |\n\n{report['summary']}\n")
    print("\n".join(experts))


if __name__ == "__main__":
    main()
