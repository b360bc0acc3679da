"""The mission: a model in the exact Llama-3-8B shape on this machine, across a master and two
workers, kept in 4 bits end to end, with each process's peak memory.

    python -m bench.mission [--tokens 16] [--threads 1] [--empty-workers]

The weights are random and written once straight as a Q4_0 GGUF (bench.gguf_writer, ~4.6 GB,
never in float) into the cake cache. Worker w1 serves blocks 0-15 and w2 blocks 16-31, each
reading only its own blocks from the file; the master holds the embedding (bf16) and the head
(Q4_0 -> int4). The master generates `--tokens` greedy tokens from a raw prompt; the report is
each process's peak RSS (VmHWM) and the decode speed. Prints markdown, writes
bench/results/mission.json.

--empty-workers: the same, set up as a user would with no topology: two empty workers (fresh
cache folders, --max-memory 3G each so the blocks must be shared) and one master command with
--workers, which measures, plans, pushes each worker its blocks' int4 tensors and runs. Also
reports the time to the first token and the bytes pushed (bench/results/mission-empty.json).
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
from cake.cluster.local_cluster import start_local_cluster
from cake.host.cache import cache_root
from cake.model.gguf import resolve_model_path

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
    parser.add_argument("--empty-workers", action="store_true", help="--workers, not a topology")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="[mission] %(message)s")
    gguf = cache_root() / "bench" / "llama-3-8b-shape-q4_0.gguf"
    if not gguf.is_file():
        gguf.parent.mkdir(parents=True, exist_ok=True)
        log.info("writing %s (random Q4_0, once; ~4.6 GB)", gguf)
        write_random_q4_0_gguf(gguf, LLAMA_3_8B)
    log.info("config and tokenizer from the file's metadata (cached once)")
    resolve_model_path(gguf)
    if args.empty_workers:
        empty_workers(gguf, args.tokens, args.threads)
        return
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
    report = _report("mission.json", gguf, rusage.ru_maxrss, worker_peaks, stdout, stderr)
    summary = report["summary"]
    total = report["master_peak_rss_bytes"] + sum(worker_peaks.values())
    print(f"Llama-3-8B shape, Q4_0 GGUF {report['file_bytes'] / GIB:.2f} GiB, master + 2 workers\n")
    print("| process | peak RSS GiB |\n|---|---:|")
    print(f"| master (embedding bf16, head int4) | {report['master_peak_rss_bytes'] / GIB:.2f} |")
    for name, peak in worker_peaks.items():
        print(f"| {name} (16 blocks int4) | {peak / GIB:.2f} |")
    print(f"| all three | {total / GIB:.2f} |\n\n{summary}")


def _report(
    name: str,
    gguf: Path,
    master_maxrss_kib: int,
    worker_peaks: dict[str, int],
    stdout: str,
    stderr: str,
    **extra: object,
) -> dict:
    """The run's numbers, written to bench/results/`name`."""
    summary = next((line for line in stderr.splitlines() if "decode:" in line), stderr[-2000:])
    report = {
        "file_bytes": gguf.stat().st_size,
        **extra,
        "master_peak_rss_bytes": master_maxrss_kib * 1024,
        "worker_peak_rss_bytes": worker_peaks,
        "summary": summary,
        "generated_chars": len(stdout),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / name).write_text(json.dumps(report, indent=2) + "\n")
    return report


def empty_workers(gguf: Path, tokens: int, threads: int) -> None:
    """The mission through `--workers`: measure, plan, push, run, in one master command."""
    import shutil
    import time

    from cake.cluster.local_cluster import WorkerProcess

    key = "mission-key"
    with tempfile.TemporaryDirectory(prefix="cake-mission-") as tmp:
        # A fresh master cache (the tensor hashes are made anew, as on a first run), but with
        # the file's config and tokenizer already read: transformers' GGUF tokenizer reading
        # (once per file, not per run) would otherwise sit under the master's peak.
        metadata = resolve_model_path(gguf)
        shutil.copytree(metadata, Path(tmp) / "master-cache" / metadata.parent.name / metadata.name)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "CAKE_CACHE_DIR": f"{tmp}/master-cache"}
        workers = []
        try:
            for name in ("w1", "w2"):
                command = [
                    sys.executable, "-m", "cake.cli", "--mode", "worker", "--cluster-key", key,
                    "--address", "127.0.0.1:0", "--cache-dir", f"{tmp}/{name}", "--device", "cpu",
                    "--threads", str(threads), "--discovery-port", "0", "--max-memory", "3G",
                ]  # fmt: skip
                worker = WorkerProcess(name, command, env)
                worker.wait_ready()
                workers.append(worker)
            addresses = ",".join(f"127.0.0.1:{w.port}" for w in workers)
            command = [
                sys.executable, "-m", "cake.cli", "--model", str(gguf), "--workers", addresses,
                "--cluster-key", key, "--master-blocks", "0", "--raw", "--prompt",
                "The mission of this machine is", "-n", str(tokens), "--temperature", "0",
                "--ignore-eos", "--device", "cpu", "--threads", str(threads),
                "--max-seq-len", "256", "--stats",
            ]  # fmt: skip
            started = time.perf_counter()
            master = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            )
            first = master.stdout.read(1)  # type: ignore[union-attr]
            first_token_s = time.perf_counter() - started
            _, rusage = os.wait4(master.pid, 0)[1:]
            total_s = time.perf_counter() - started
            stdout = first + master.stdout.read()  # type: ignore[union-attr]
            stderr = master.stderr.read()  # type: ignore[union-attr]
            worker_peaks = {w.name: peak_rss(w.proc.pid) for w in workers}
        finally:
            for worker in workers:
                worker.stop()
    if master.returncode:
        raise SystemExit(f"the master failed:\n{stderr[-3000:]}")
    pushed = re.findall(r"pushed ([\d.]+ \w+) of [\d.]+ \w+ for blocks ([\d-]+)", stderr)
    report = _report(
        "mission-empty.json",
        gguf,
        rusage.ru_maxrss,
        worker_peaks,
        stdout,
        stderr,
        first_text_s=round(first_token_s, 1),
        total_s=round(total_s, 1),
        pushed=pushed,
    )
    summary = report["summary"]
    total = report["master_peak_rss_bytes"] + sum(worker_peaks.values())
    print(
        f"Llama-3-8B shape, Q4_0 GGUF {report['file_bytes'] / GIB:.2f} GiB, master + 2 empty "
        f"workers (--workers): first text after {first_token_s:.0f} s (hash, convert, push, "
        f"load), done after {total_s:.0f} s\n"
    )
    print("| process | pushed | peak RSS GiB |\n|---|---|---:|")
    print(f"| master | | {report['master_peak_rss_bytes'] / GIB:.2f} |")
    for (name, peak), (size, blocks) in zip(worker_peaks.items(), pushed, strict=False):
        print(f"| {name} | {size} (blocks {blocks}) | {peak / GIB:.2f} |")
    print(f"| all three | | {total / GIB:.2f} |\n\n{summary}")


if __name__ == "__main__":
    main()
