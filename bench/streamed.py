"""Every configuration as its users run it: its own process, timed from outside on its stdout.

transformers runs `generate` with a `TextStreamer` (bench/hf_generate.py), cake runs as it ships
(the `cake-cli` script, or `python -m cake.cli` where there is none), each in a fresh process
with the environment this benchmark was given, minus any OMP_WAIT_POLICY (so each picks its
own: libgomp's default for transformers, `--thread-wait auto` for cake, unless a configuration
says otherwise).
Same chat prompt, greedy, exactly N new tokens (EOS does not stop either), same dtype and device.

decode tok/s = (N - 1) / (time of the last stdout chunk - time of the first): what a user sees
stream, with no help from the process's own counters. (transformers' TextStreamer prints whole
words, so its first chunk can come a token or two later than cake's: its figure is, if anything,
a little flattering.) cake's own `decode:` figure from its stats line is kept beside it.

Workers of a distributed configuration are started for each of its runs and stopped right after,
so that no idle worker (spinning, under `spin`) disturbs another configuration's run.

A hook for other engines: a module `bench.quant` may define
`llama_cpp_command(folder: Path, prompt: str, tokens: int, device: str) -> list[str] | None`
returning the argv of a process that streams exactly `tokens` greedy tokens of the model's answer
to stdout (None: not available here); it is then measured like transformers, as "llama.cpp".
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.cluster import even_layers, topology_entries
from bench.stats import ratios, spread
from cake.cluster.local_cluster import WorkerProcess, start_local_cluster

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Write a long story about a lighthouse keeper and a storm."
TRANSFORMERS = "transformers"
LOCAL = "cake local"
STATS = re.compile(r"prompt tokens: (\d+), new tokens: (\d+), .*decode: ([\d.]+) tok/s")
HF_PROMPT = re.compile(r"prompt tokens: (\d+)")
POLICY = re.compile(r"idle CPU threads: (spin|sleep|brief) \((.*)\)$", re.MULTILINE)
RUN_TIMEOUT_S = 600.0
BRIEF_SPINCOUNT = "20000"  # libgomp spins: tens of microseconds, then sleeps


@dataclass(frozen=True)
class Config:
    label: str
    argv: list[str]  # the command a user types (workers, if any, are started first)
    baseline: str | None  # the label this configuration's ratio is taken against
    workers: int = 0  # worker processes on 127.0.0.1, blocks split evenly, none on the master
    worker_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # added to the environment of master and workers


@dataclass
class Streamed:
    text: str
    chunk_s: list[float]  # each stdout read, seconds since the process started
    stderr: str
    wall_s: float

    def decode_tok_s(self, tokens: int) -> float:
        span = self.chunk_s[-1] - self.chunk_s[0] if len(self.chunk_s) > 1 else 0.0
        return (tokens - 1) / span if span > 0 else 0.0


@dataclass
class Row:
    outside_tok_s: list[float] = field(default_factory=list)
    inside_tok_s: list[float] = field(default_factory=list)  # cake's own stats line
    texts: list[str] = field(default_factory=list)
    prompt_tokens: int | None = None
    policy: str = ""  # what cake chose for idle threads, and why


def user_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment, minus OMP_WAIT_POLICY, with this tree importable."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)
    return {**env, **(extra or {})}


def stream(argv: Sequence[str], env: dict[str, str], timeout: float = RUN_TIMEOUT_S) -> Streamed:
    """Run argv; the time of every chunk it writes to stdout, its text and its stderr."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    errors: list[bytes] = []
    assert proc.stdout is not None and proc.stderr is not None
    drain = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)
    drain.start()
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    chunks, times = [], []
    try:
        while chunk := os.read(proc.stdout.fileno(), 1 << 16):
            times.append(time.perf_counter() - started)
            chunks.append(chunk)
        proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        drain.join(5)
        proc.stdout.close()
        proc.stderr.close()
    stderr = b"".join(errors).decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv[:4])} ... exited with {proc.returncode}; its stderr ends:\n"
            + "\n".join(stderr.splitlines()[-15:])
        )
    return Streamed(
        b"".join(chunks).decode(errors="replace"), times, stderr, times[-1] if times else 0.0
    )


def cake_cli() -> list[str]:
    """The `cake-cli` script beside this Python (it imports this tree: PYTHONPATH comes first),
    else the same entry point as a module."""
    script = Path(sys.executable).with_name("cake-cli")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cake.cli"]


def _cake(folder: Path, prompt: str, tokens: int, device: str, dtype: str) -> list[str]:
    return [
        *cake_cli(),
        "--model",
        str(folder),
        "--prompt",
        prompt,
        "-n",
        str(tokens),
        "--temperature",
        "0",
        "--ignore-eos",
        "--device",
        device,
        "--dtype",
        dtype,
    ]


def _transformers(folder: Path, prompt: str, tokens: int, device: str, dtype: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.hf_generate",
        "--model",
        str(folder),
        "--prompt",
        prompt,
        "--tokens",
        str(tokens),
        "--device",
        device,
        "--dtype",
        dtype,
    ]


def usable_cpus() -> int:
    """CPUs this process may run on (torch uses one thread per physical core of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _llama_cpp_hook() -> Callable[..., list[str] | None] | None:
    try:
        from bench import quant  # type: ignore[attr-defined]
    except ImportError:
        return None
    return getattr(quant, "llama_cpp_command", None)


def configurations(
    folder: Path,
    prompt: str,
    tokens: int,
    device: str,
    dtype: str,
    worker_counts: Sequence[int] = (2,),
    policies: bool = True,
) -> list[Config]:
    """transformers (and llama.cpp if the hook offers it), cake local, cake + N workers; with
    `policies`, also each thread-waiting choice forced and half the threads, to measure what
    `auto` and the default thread count chose against."""
    cake = _cake(folder, prompt, tokens, device, dtype)
    configs = [Config(TRANSFORMERS, _transformers(folder, prompt, tokens, device, dtype), None)]
    hook = _llama_cpp_hook()
    llama_cpp = hook(folder, prompt, tokens, device) if hook is not None else None
    if llama_cpp:
        configs.append(Config("llama.cpp", llama_cpp, TRANSFORMERS))
    configs.append(Config(LOCAL, cake, TRANSFORMERS))
    if policies and device == "cpu":
        for wait in ("spin", "sleep"):
            configs.append(Config(f"{LOCAL}, {wait}", [*cake, "--thread-wait", wait], TRANSFORMERS))
        fewer = max(1, usable_cpus() // 2)  # is one thread per core still the right count?
        label = f"{LOCAL}, {fewer} thread{'s' if fewer > 1 else ''}"
        configs.append(Config(label, [*cake, "--threads", str(fewer)], TRANSFORMERS))
    for n in worker_counts:
        configs.append(Config(f"cake + {n} workers", cake, LOCAL, workers=n))
        if policies and device == "cpu":
            spin = ("--thread-wait", "spin")
            configs.append(
                Config(f"cake + {n} workers, spin", [*cake, *spin], LOCAL, n, worker_args=spin)
            )
            # libgomp's bounded spin: quick wake-ups inside a step, sleep between steps
            brief = (("GOMP_SPINCOUNT", BRIEF_SPINCOUNT),)
            configs.append(Config(f"cake + {n} workers, brief spin", cake, LOCAL, n, env=brief))
    return configs


@contextlib.contextmanager
def _workers(config: Config, folder: Path, device: str, dtype: str, env: dict[str, str]):
    """The configuration's argv, with a topology of freshly started workers if it has any."""
    if not config.workers:
        yield config.argv
        return
    with tempfile.TemporaryDirectory(prefix="cake-bench-") as tmp:
        topology = Path(tmp) / "topology.yml"
        n_layers = _n_layers(folder)
        layers = topology_entries(even_layers(n_layers, config.workers))
        extra = ("--device", device, "--dtype", dtype, *config.worker_args)
        workers: list[WorkerProcess] = start_local_cluster(
            folder, layers, topology, extra=extra, env=env
        )
        try:
            yield [*config.argv, "--topology", str(topology)]
        finally:
            for worker in workers:
                worker.stop()


def _n_layers(folder: Path) -> int:
    import json

    return json.loads((folder / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"]


def run_once(config: Config, folder: Path, tokens: int, device: str, dtype: str, row: Row) -> None:
    env = user_env(dict(config.env))
    with _workers(config, folder, device, dtype, env) as argv:
        result = stream(argv, env)
    row.outside_tok_s.append(result.decode_tok_s(tokens))
    row.texts.append(result.text.strip())
    if stats := STATS.search(result.stderr):
        row.prompt_tokens = int(stats[1])
        row.inside_tok_s.append(float(stats[3]))
    elif hf := HF_PROMPT.search(result.stderr):
        row.prompt_tokens = int(hf[1])
    if policy := POLICY.search(result.stderr):
        row.policy = f"{policy[1]} ({policy[2]})"


def measure_streamed(
    folder: Path,
    title: str,
    dtype: str,
    device: str = "cpu",
    tokens: int = 128,
    rounds: int = 3,
    prompt: str = PROMPT,
    worker_counts: Sequence[int] = (2,),
    policies: bool = True,
) -> dict:
    """Every configuration once per round (reversed every other round); spreads and ratios."""
    configs = configurations(folder, prompt, tokens, device, dtype, worker_counts, policies)
    rows = {config.label: Row() for config in configs}
    for round_index in range(rounds):
        order = configs if round_index % 2 == 0 else list(reversed(configs))
        for config in order:
            log.info("streamed, round %d/%d: %s", round_index + 1, rounds, config.label)
            run_once(config, folder, tokens, device, dtype, rows[config.label])
    reference = rows[TRANSFORMERS].texts[0]
    summary = {}
    for config in configs:
        row = rows[config.label]
        entry: dict = {
            "baseline": config.baseline,
            "decode_tok_s": spread(row.outside_tok_s),
            "same_text_as_transformers": all(text == reference for text in row.texts),
            "prompt_tokens": row.prompt_tokens,
            "thread_wait": row.policy,
            "rounds": row.outside_tok_s,
        }
        if row.inside_tok_s:
            entry["inside_decode_tok_s"] = spread(row.inside_tok_s)
        for name, base in (("baseline", config.baseline), ("transformers", TRANSFORMERS)):
            if base is not None and base != config.label:
                entry[f"decode_vs_{name}"] = ratios(row.outside_tok_s, rows[base].outside_tok_s)
        summary[config.label] = entry
    return {
        "title": title,
        "folder": str(folder),
        "device": device,
        "dtype": dtype,
        "tokens": tokens,
        "rounds": rounds,
        "prompt": prompt,
        "configs": summary,
    }
