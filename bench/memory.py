"""Issue 24's memory goal: a master and two workers on one host, their memory together.

    python -m bench.memory [--model 8b|1b|demo|FILE.gguf] [--tokens 48]

Two workers (`cake-cli --mode worker` on 127.0.0.1, each on a free port) split the model's
blocks in halves; the master is a third process, `cake-cli --model FILE --topology T --prompt
... -n N --temperature 0 --ignore-eos`, so all three are measured the same way, from outside.
Every 0.2 s, from the workers' start to the master's exit, each child process's
/proc/PID/smaps_rollup is read (Rss, Pss, Pss_Anon, Pss_File) with its VmHWM (the kernel's
peak RSS). PSS divides a page mapped by several processes among them (the same file's pages,
torch's libraries), so the three PSS add up to what they hold together; RSS counts a shared page
once per process that maps it. Pages of a file that were read but are not mapped (page cache)
are in neither.

Reported, per process and summed over the three: the peak (the largest sample) and the steady
value (the median of the samples while the master decodes: the seconds its stats line reports,
up to that line). Once a second during decode each process's /proc/PID/smaps is read too; its
fullest read (not one from the master's teardown) splits its PSS by what is mapped: anonymous
memory (tensors built at load, the KV cache, the Python heap), the GGUF file, the packed-weight
cache's files, other files (code).

The model: `8b` (default: the Llama-3-8B shape, Q4_0, random weights, issue 24's), `1b`, `demo`
or a .gguf path. The packed-weight cache is the bench's own (`<cache>/bench/memory-cache`); one
untimed start (the workers and a one-token master) fills it first, so the measured start is a
warm one, as every start after a model's first is. Prints the markdown table with the goal line
(summed PSS <= file + 1.5 GiB) and writes bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.cluster import even_layers, topology_entries
from bench.machine import cpu_label, machine_info, write_result
from bench.mission import GIB
from bench.startup import model_file
from cake.cluster.local_cluster import start_local_cluster
from cake.host.cache import cache_root
from cake.model.config import LlamaConfig
from cake.model.opener import open_model

PROMPT = "Tell me about the history of the bridges of Paris."
EXTRA = ("--device", "cpu")
GOAL_MARGIN = 1.5 * GIB  # issue 24: the three together within the file's size + 1.5 GiB
FIELDS = ("Pss", "Rss", "Pss_Anon", "Pss_File")
KINDS = ("anonymous", "GGUF file", "weight cache", "other files")
SAMPLE_EVERY = 0.2
SPLIT_EVERY = 1.0
MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")  # a /proc/PID/smaps mapping's header line


def parse_smaps_rollup(text: str) -> dict[str, int]:
    """Bytes per field of /proc/PID/smaps_rollup (or /proc/PID/status) text: `Pss:  12 kB`
    -> {'Pss': 12288}; lines without a kB value are left out."""
    fields = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            fields[name] = int(parts[0]) * 1024
    return fields


def parse_smaps(text: str, kind_of: Callable[[str], str]) -> dict[str, int]:
    """PSS bytes of /proc/PID/smaps text per kind of mapping, `kind_of(path)` naming each kind
    (the path is '' for an anonymous mapping, '[heap]' and the like for the kernel's)."""
    totals: dict[str, int] = {}
    kind = ""
    for line in text.splitlines():
        if MAPPING.match(line):
            fields = line.split(maxsplit=5)
            kind = kind_of(fields[5] if len(fields) == 6 else "")
        elif line.startswith("Pss:"):
            totals[kind] = totals.get(kind, 0) + int(line.split()[1]) * 1024
    return totals


def mapping_kind(model: Path, weight_cache: Path) -> Callable[[str], str]:
    """What a mapped path is: anonymous, the GGUF file, a packed-weight cache file, or other."""
    gguf, cache = str(model.resolve()), str(weight_cache.resolve())

    def kind_of(path: str) -> str:
        if not path or path.startswith("["):
            return "anonymous"
        if path == gguf:
            return "GGUF file"
        return "weight cache" if path.startswith(cache) else "other files"

    return kind_of


def child_pids() -> list[int]:
    """Processes whose parent is this one (the workers and the master)."""
    me, children = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as stat:
                parent = int(stat.read().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == me:
            children.append(int(entry))
    return children


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except OSError:  # the process ended
        return ""


STATS = re.compile(r"new tokens: (\d+), prefill: [\d.]+ tok/s, decode: ([\d.]+) tok/s")
LOADED = "master runs "  # the master's log line once its weights are loaded


def decode_seconds(stats_line: str) -> float | None:
    """How long the decode took, from the master's stats line (`... new tokens: 48, prefill:
    9.1 tok/s, decode: 3.2 tok/s`: the 47 tokens after the first at 3.2 tok/s); None when the
    line is not the stats line."""
    match = STATS.search(stats_line)
    if not match:
        return None
    tokens, speed = int(match.group(1)) - 1, float(match.group(2))
    return tokens / speed if tokens > 0 and speed > 0 else 0.0


@dataclass
class Sample:
    at: float  # time.perf_counter()
    memory: dict[int, dict[str, int]]  # pid -> FIELDS and VmHWM, in bytes


@dataclass
class Sampler:
    """Samples every child process's memory on a thread until `stop`; once `reading_maps` is
    set, it also splits each one's PSS by mapping once a second."""

    kind_of: Callable[[str], str]
    reading_maps: bool = False
    samples: list[Sample] = field(default_factory=list)
    splits: list[tuple[float, int, dict[str, int]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last_split = 0.0
        while not self._stop.is_set():
            now, memory = time.perf_counter(), {}
            for pid in child_pids():
                fields = parse_smaps_rollup(read_text(f"/proc/{pid}/smaps_rollup"))
                if "Pss" in fields:  # a process that has ended has none
                    status = parse_smaps_rollup(read_text(f"/proc/{pid}/status"))
                    memory[pid] = {**fields, "VmHWM": status.get("VmHWM", 0)}
            self.samples.append(Sample(now, memory))
            if self.reading_maps and now - last_split >= SPLIT_EVERY:
                last_split = now
                for pid in memory:
                    split = parse_smaps(read_text(f"/proc/{pid}/smaps"), self.kind_of)
                    self.splits.append((now, pid, split))
            self._stop.wait(max(SAMPLE_EVERY - (time.perf_counter() - now), 0.0))


def run_cluster(
    model: Path,
    layers: dict[str, list[str]],
    env: dict[str, str],
    tokens: int,
    sampler: Sampler | None = None,
) -> tuple[dict[int, str], tuple[float, float]]:
    """Two workers and a master generating `tokens` tokens; the name of each process id, and
    when the decode ran (perf_counter times: its end is the master's stats line, its length
    from the decode speed on that line; stdout is no clock: the random-weight models' text
    often comes out only at the end, held back by the detokenizer)."""
    with tempfile.TemporaryDirectory() as tmp:
        topology = Path(tmp) / "topology.yml"
        workers = start_local_cluster(model, layers, topology, EXTRA, env=env, timeout=1800)
        try:
            command = [sys.executable, "-m", "cake.cli", "--model", str(model), "--topology"]
            command += [str(topology), "--prompt", PROMPT, "-n", str(tokens), "--temperature"]
            command += ["0", "--ignore-eos", *EXTRA]
            master = subprocess.Popen(
                command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            assert master.stderr is not None
            log, window = [], None
            for line in master.stderr:
                log.append(line)
                if sampler and LOADED in line:
                    sampler.reading_maps = True
                seconds = decode_seconds(line)
                if seconds is not None:
                    window = (time.perf_counter() - seconds, time.perf_counter())
            if master.wait() != 0 or window is None:
                raise SystemExit(f"{' '.join(command)} failed:\n{''.join(log)[-3000:]}")
        finally:
            for worker in workers:
                worker.stop()
    names = {worker.proc.pid: worker.name for worker in workers}
    return {master.pid: "master", **names}, window


def summarize(
    samples: list[Sample], names: dict[int, str], window: tuple[float, float]
) -> dict[str, dict[str, int]]:
    """Per process and for all three: peak and steady (median during decode) of each field."""
    decode = [s for s in samples if window[0] <= s.at <= window[1] and len(s.memory) == len(names)]
    if not decode:
        raise SystemExit("no sample fell in the decode: raise --tokens")
    rows = {}
    for pid, name in names.items():
        seen = [s.memory[pid] for s in samples if pid in s.memory]
        row = {f"peak_{f}": max(memory[f] for memory in seen) for f in FIELDS}
        row |= {
            f"steady_{f}": int(statistics.median(s.memory[pid][f] for s in decode)) for f in FIELDS
        }
        row["peak_VmHWM"] = max(memory["VmHWM"] for memory in seen)
        rows[name] = row

    def summed(sample: Sample, name: str) -> int:
        return sum(memory[name] for memory in sample.memory.values())

    total = {f"peak_{f}": max(summed(s, f) for s in samples) for f in FIELDS}
    total |= {f"steady_{f}": int(statistics.median(summed(s, f) for s in decode)) for f in FIELDS}
    total["peak_VmHWM"] = sum(row["peak_VmHWM"] for row in rows.values())
    rows["all three"] = total
    return rows


def fullest_splits(
    splits: list[tuple[float, int, dict[str, int]]],
    names: dict[int, str],
    window: tuple[float, float],
) -> dict[str, dict[str, int]]:
    """Each process's split by mapping from its read with the most PSS during the decode."""
    best: dict[str, dict[str, int]] = {}
    for at, pid, split in splits:
        name = names.get(pid)
        in_decode = window[0] <= at <= window[1]
        if name and in_decode and sum(split.values()) > sum(best.get(name, {}).values()):
            best[name] = split
    return {name: best[name] for name in names.values() if name in best}


def sample_json(sample: Sample, names: dict[int, str], start: float) -> dict:
    memory = {names.get(pid, str(pid)): fields for pid, fields in sample.memory.items()}
    return {"s": round(sample.at - start, 2), "memory": memory}


def gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def report(result: dict, machine: dict) -> str:
    rows, file_bytes = result["rows"], result["file_bytes"]
    goal = file_bytes + GOAL_MARGIN
    peak, steady = rows["all three"]["peak_Pss"], rows["all three"]["steady_Pss"]
    decode_start, decode_end = result["decode_s"]
    lines = [
        f"CPU: {cpu_label(machine)}, torch {machine['torch']}; {result['file']} "
        f"({gib(file_bytes)} GiB), master + 2 workers on 127.0.0.1, warm packed-weight cache, "
        f"{result['tokens']} tokens ({result['decode_samples']} samples during "
        f"{decode_end - decode_start:.1f} s of decode). GiB:",
        "",
        "| process | holds | peak PSS | steady PSS (decode) | of it anon / file "
        "| steady RSS | peak RSS (VmHWM) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {result['holds'][name]} | {gib(row['peak_Pss'])} "
            f"| {gib(row['steady_Pss'])} | {gib(row['steady_Pss_Anon'])} / "
            f"{gib(row['steady_Pss_File'])} | {gib(row['steady_Rss'])} | {gib(row['peak_VmHWM'])} |"
        )
    met = "met" if peak <= goal else f"not met (by {gib(peak - goal)} GiB)"
    lines += [
        "",
        f"Goal: summed PSS <= file + 1.5 GiB = {gib(goal)} GiB; peak summed PSS {gib(peak)} "
        f"GiB, steady {gib(steady)} GiB: **{met}**.",
        "",
        "PSS by mapping, the fullest read during decode (GiB):",
        "",
        "| process | " + " | ".join(KINDS) + " |",
        "|---|" + "---|" * len(KINDS),
    ]
    for name, split in result["split"].items():
        lines.append(f"| {name} | " + " | ".join(gib(split.get(k, 0)) for k in KINDS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="8b", help="8b, 1b, demo or a .gguf file")
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    model = Path(args.model) if args.model.endswith(".gguf") else model_file(args.model)
    n_layers = LlamaConfig.from_folder(open_model(model).folder).n_layers
    blocks = even_layers(n_layers, 2)
    layers = topology_entries(blocks)
    cache = cache_root() / "bench" / "memory-cache"
    env = {**os.environ, "CAKE_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
    env.pop("CAKE_NO_WEIGHT_CACHE", None)
    machine = machine_info(torch.get_num_threads())

    print(f"warm-up start (fills {cache})", file=sys.stderr)
    run_cluster(model, layers, env, 1)
    sampler = Sampler(mapping_kind(model, cache / "weights"))
    sampler.start()
    try:
        names, window = run_cluster(model, layers, env, args.tokens, sampler)
    finally:
        sampler.stop()
    start = sampler.samples[0].at
    holds = {name: f"blocks {run.start}-{run.stop - 1}" for name, run in blocks.items()}
    result = {
        "model": str(model),
        "file": model.name,
        "file_bytes": model.stat().st_size,
        "tokens": args.tokens,
        "layers": layers,
        "holds": {"master": "embedding, final norm, head", **holds, "all three": ""},
        "decode_s": [round(at - start, 2) for at in window],
        "decode_samples": sum(window[0] <= s.at <= window[1] for s in sampler.samples),
        "rows": summarize(sampler.samples, names, window),
        "split": fullest_splits(sampler.splits, names, window),
        "goal_bytes": model.stat().st_size + GOAL_MARGIN,
        "samples": [sample_json(s, names, start) for s in sampler.samples],
    }
    print(report(result, machine))
    out = write_result("memory", {"machine": machine, "args": vars(args), **result}, indent=1)
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
