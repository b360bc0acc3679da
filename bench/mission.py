"""The mission: a model in the exact Llama-3-8B shape on this machine, across a master and two
workers, kept in 4 bits end to end, with each process's peak memory.

    python -m bench.mission [--tokens 16] [--threads 1]

The weights are random and written once straight as a Q4_0 GGUF (bench.gguf_writer, ~4.6 GB,
never in float) into the cake cache. Worker w1 serves blocks 0-15 and w2 blocks 16-31, each
reading only its own blocks from the file; the master holds the embedding (bf16) and the head
(Q4_0 -> int4). The master generates `--tokens` greedy tokens from a raw prompt; the report is
each process's peak RSS (VmHWM) and the decode speed. Prints markdown, writes
bench/results/mission.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.gguf_writer import LLAMA_3_8B, write_random_q4_0_gguf
from cake.gguf import cache_root, resolve_model_path
from cake.local_cluster import start_local_cluster

log = logging.getLogger("bench")
RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1 << 30


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="utf-8") as status:
        match = re.search(r"VmHWM:\s+(\d+) kB", status.read())
    return int(match.group(1)) * 1024 if match else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="[mission] %(message)s")
    gguf = cache_root() / "bench" / "llama-3-8b-shape-q4_0.gguf"
    if not gguf.is_file():
        gguf.parent.mkdir(parents=True, exist_ok=True)
        log.info("writing %s (random Q4_0, once; ~4.6 GB)", gguf)
        write_random_q4_0_gguf(gguf, LLAMA_3_8B)
    log.info("config and tokenizer from the file's metadata (cached once)")
    resolve_model_path(gguf)
    with tempfile.TemporaryDirectory() as tmp:
        topology = Path(tmp) / "topology.yml"
        layers = {"w1": ["model.layers.0-15"], "w2": ["model.layers.16-31"]}
        extra = ("--device", "cpu", "--threads", str(args.threads), "--max-seq-len", "256")
        workers = start_local_cluster(gguf, layers, topology, extra=extra, timeout=1800)
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
    summary = next((line for line in stderr.splitlines() if "decode:" in line), stderr[-2000:])
    report = {
        "file_bytes": gguf.stat().st_size,
        "master_peak_rss_bytes": rusage.ru_maxrss * 1024,
        "worker_peak_rss_bytes": worker_peaks,
        "summary": summary,
        "generated_chars": len(stdout),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mission.json").write_text(json.dumps(report, indent=2) + "\n")
    total = report["master_peak_rss_bytes"] + sum(worker_peaks.values())
    print(f"Llama-3-8B shape, Q4_0 GGUF {report['file_bytes'] / GIB:.2f} GiB, master + 2 workers\n")
    print("| process | peak RSS GiB |\n|---|---:|")
    print(f"| master (embedding bf16, head int4) | {report['master_peak_rss_bytes'] / GIB:.2f} |")
    for name, peak in worker_peaks.items():
        print(f"| {name} (16 blocks int4) | {peak / GIB:.2f} |")
    print(f"| all three | {total / GIB:.2f} |\n\n{summary}")


if __name__ == "__main__":
    main()
