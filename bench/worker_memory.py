"""Worker resident memory against what it must hold: its blocks' bytes plus an idle torch.

overhead = RSS - blocks' bytes - RSS of an idle `python -c "import torch"` process. It includes
the worker's KV cache for one session (its size is reported next to it), cake's own imports
(msgpack, yaml, safetensors), and whatever the allocator keeps after a generation.
"""

from __future__ import annotations

import statistics
import subprocess
import sys

import psutil

from bench.models import ModelSpec
from bench.runs import CakeRunner

IDLE_TORCH = "import sys, torch; print('ready', flush=True); sys.stdin.read()"
MIB = 1 << 20


def idle_torch_rss(samples: int = 3) -> int:
    """Median RSS of a process that imported torch and waits (measured from outside, as workers)."""
    values = []
    for _ in range(samples):
        proc = subprocess.Popen(
            [sys.executable, "-c", IDLE_TORCH],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None and proc.stdin is not None
            proc.stdout.readline()
            values.append(psutil.Process(proc.pid).memory_info().rss)
        finally:
            proc.communicate("")  # EOF on stdin: it exits
    return int(statistics.median(values))


def kv_cache_bytes(spec: ModelSpec, n_blocks: int, max_seq_len: int) -> int:
    """One session's static KV cache on a worker: keys and values for every block it holds."""
    config = spec.config
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_block = 2 * config["num_key_value_heads"] * head_dim * max_seq_len
    return per_block * n_blocks * spec.torch_dtype.itemsize


def worker_rows(spec: ModelSpec, runner: CakeRunner, idle_rss: int, max_seq_len: int) -> list[dict]:
    rows = []
    for memory in runner.memory:
        peak = max(memory.rss_bytes.values())
        rows.append(
            {
                "model": spec.title,
                "config": runner.label,
                "worker": memory.name,
                "blocks": f"{memory.blocks.start}-{memory.blocks.stop - 1}",
                "blocks_bytes": memory.blocks_bytes,
                "kv_cache_bytes": kv_cache_bytes(spec, len(memory.blocks), max_seq_len),
                "rss_bytes": dict(memory.rss_bytes),
                "idle_torch_bytes": idle_rss,
                "overhead_bytes": peak - memory.blocks_bytes - idle_rss,
            }
        )
    return rows
