"""The machine a run was measured on, its memory read bandwidth (the decode speed limit), and
where a benchmark writes what it measured (bench/results/)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from cake.model.kernels.probe import cpu_model

BANDWIDTH_BYTES = 1 << 30  # 1 GiB: far larger than any cache, so every pass streams from DRAM


# The instruction-set features that decide which CPU kernels torch can use (bf16 dot products,
# AMX tiles): a table is only comparable with another from a CPU with the same ones.
FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_features() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [f for f in FEATURES if f in flags]
    except OSError:
        pass
    return []


def cpu_label(info: dict) -> str:
    """How a table names its CPU: model, cores, features."""
    features = ", ".join(info.get("cpu_features", [])) or "no AVX2"
    return f"{info['cpu']}, {info['cores']} cores ({features})"


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def machine_info(threads: int) -> dict:
    import transformers

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset: libgomp's default)"),
        "load_average_start": load_average(),
    }


def read_bandwidth(passes: int = 5) -> dict:
    """Bytes per second that `sum` of a 1 GiB float32 tensor reads, with this process's threads.

    A decode step reads every weight once, so this is the ceiling a decoder can approach. The
    median of `passes` timed sums after one untimed pass (which faults the pages in).
    """
    data = torch.ones(BANDWIDTH_BYTES // 4, dtype=torch.float32)
    data.sum()
    seconds = []
    for _ in range(passes):
        started = time.perf_counter()
        data.sum()
        seconds.append(time.perf_counter() - started)
    del data
    rates = [BANDWIDTH_BYTES / s for s in seconds]
    return {
        "bytes_per_s": statistics.median(rates),
        "min_bytes_per_s": min(rates),
        "max_bytes_per_s": max(rates),
        "passes": passes,
    }


RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, result: dict, indent: int = 2) -> Path:
    """bench/results/NAME.json holding `result` (the machine's description in it too, under
    "machine", as the benchmark put it); its path."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(result, indent=indent, default=str))
    return out
