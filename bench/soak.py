"""Soak: concurrent API clients while a fault injector kills, freezes and cuts off workers.

    python -m bench.soak --minutes 3 --workers 3 --clients 4

For `--minutes`, `--clients` threads ask the OpenAI-compatible API (one `cake-cli --api` process)
for greedy chat completions through `--workers` worker processes. Each worker sits behind a small
TCP proxy in this process, so a connection can be cut without touching the worker. Every few
seconds the injector does one of:

* kill:   SIGKILL a worker, then start it again (on a new port; its proxy follows); never the
          first worker, whose open files and memory are compared at the end;
* freeze: SIGSTOP a worker for a random time, some shorter and some longer than --retry-timeout,
          then SIGCONT;
* drop:   close every connection through one worker's proxy (a network cut).

Every answer must be exactly the fault-free text for its prompt (computed before the faults), or
an HTTP error with an OpenAI error body (a clean failure, e.g. a worker frozen past the retry
timeout). Anything else (a different text, a hang, a 500, a dropped HTTP connection) is "lost".
At the end the API process's and the surviving workers' open files and memory are compared with
the start. The summary goes to stdout and to --out (soak.json, soak.md). Exit status 1 if any
request was lost or a process leaked file descriptors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import yaml

from bench.api_throughput import default_model, worker_layers
from cake.cluster.local_cluster import WorkerProcess, start_local_cluster, worker_command
from cake.model.gguf import resolve_model_path

PROMPTS = [
    "Name three colours.",
    "What is the capital of France?",
    "Count from one to five.",
    "Say hello in Spanish.",
    "Why is the sky blue?",
    "Write a haiku about rain.",
]
MODEL_NAME = ["cake"]  # replaced by the name the API serves, once it is up
FD_SLACK = 4  # open files a process may gain over a soak without it counting as a leak


# ---------------------------------------------------------------------------------------------
# A TCP proxy per worker, so that connections can be cut and a restarted worker followed


class Proxy:
    def __init__(self, loop: asyncio.AbstractEventLoop, target_port: int) -> None:
        self.loop, self.target_port = loop, target_port
        self.writers: set[asyncio.StreamWriter] = set()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._pipe, "127.0.0.1", 0), loop
        ).result()
        self.port = self.server.sockets[0].getsockname()[1]

    async def _pipe(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            worker_r, worker_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        self.writers.update((client_w, worker_w))

        async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while chunk := await reader.read(1 << 16):
                    writer.write(chunk)
                    await writer.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        await asyncio.gather(copy(client_r, worker_w), copy(worker_r, client_w))
        self.writers.difference_update((client_w, worker_w))


# ---------------------------------------------------------------------------------------------
# The cluster under test


class Cluster:
    def __init__(self, model: Path, scratch: Path, n_workers: int, args: argparse.Namespace):
        self.model, self.scratch = model, scratch
        self.worker_topology = scratch / "workers.yml"
        self.extra = ("--device", "cpu", "--max-seq-len", "512")
        self.workers = {
            w.name: w
            for w in start_local_cluster(
                model, worker_layers(model, n_workers), self.worker_topology, self.extra
            )
        }
        self.restarted: set[str] = set()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.proxies = {name: Proxy(self.loop, w.port) for name, w in self.workers.items()}
        spec = yaml.safe_load(self.worker_topology.read_text())
        for name, proxy in self.proxies.items():
            spec[name]["host"] = f"127.0.0.1:{proxy.port}"  # the master sees only the proxies
        self.api_topology = scratch / "api.yml"
        self.api_topology.write_text(yaml.safe_dump(spec))
        self.api, self.url = self._start_api(args)

    def _start_api(self, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
        command = [sys.executable, "-m", "cake.cli", "--model", str(self.model), "--device", "cpu"]
        command += ["--topology", str(self.api_topology), "--max-seq-len", "512"]
        command += ["--api", "127.0.0.1:0", "--max-concurrent", "64"]
        command += ["--retry-timeout", str(args.retry_timeout)]
        command += ["--heartbeat-timeout", str(args.heartbeat_timeout)]
        log = open(self.scratch / "api.log", "w")  # noqa: SIM115 - lives as long as the process
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            match = re.search(r"API on (http://\S+)", (self.scratch / "api.log").read_text())
            if match:
                with urllib.request.urlopen(f"{match.group(1)}/v1/models", timeout=30) as reply:
                    MODEL_NAME[0] = json.loads(reply.read())["data"][0]["id"]
                return process, match.group(1)
            time.sleep(0.2)
        process.kill()
        raise SystemExit(f"the API did not start; see {self.scratch / 'api.log'}")

    def kill_and_restart(self, name: str, down_s: float) -> str:
        self.workers[name].kill()
        time.sleep(down_s)
        command = worker_command(self.model, name, self.worker_topology, "127.0.0.1:0", self.extra)
        process = WorkerProcess(name, command, {**os.environ, "PYTHONUNBUFFERED": "1"})
        process.wait_ready()
        self.workers[name] = process
        self.proxies[name].target_port = process.port
        self.restarted.add(name)
        return f"down {down_s:.1f}s, back on port {process.port}"

    def freeze(self, name: str, stall_s: float) -> str:
        pid = self.workers[name].proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(stall_s)
        finally:
            os.kill(pid, signal.SIGCONT)
        return f"frozen {stall_s:.1f}s"

    def drop(self, name: str) -> str:
        proxy = self.proxies[name]
        proxy.loop.call_soon_threadsafe(_abort_all, proxy)
        return f"{len(proxy.writers) // 2} connection(s) cut"

    def processes(self) -> dict[str, int]:
        """Process label -> pid, for the resource check (workers that were never restarted)."""
        pids = {"api": self.api.pid}
        pids.update(
            {f"worker {n}": w.proc.pid for n, w in self.workers.items() if n not in self.restarted}
        )
        return pids

    def stop(self) -> None:
        self.api.send_signal(signal.SIGTERM)
        try:
            self.api.wait(20)
        except subprocess.TimeoutExpired:
            self.api.kill()
        for worker in self.workers.values():
            if worker.proc.poll() is None:
                os.kill(worker.proc.pid, signal.SIGCONT)
            worker.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)


def _abort_all(proxy: Proxy) -> None:
    for writer in list(proxy.writers):
        writer.transport.abort()


# ---------------------------------------------------------------------------------------------
# Clients and the injector


def ask(url: str, prompt: str, max_tokens: int, timeout: float) -> tuple[int, str]:
    """(HTTP status, completion text or the error body's message)."""
    body = {
        "model": MODEL_NAME[0],
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())["choices"][0]["message"]["content"]
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return exc.code, ""  # no OpenAI error body: not a clean failure


@dataclass
class Outcome:
    prompt: int
    started: float
    ended: float
    status: int
    verdict: str = ""  # ok | recovered | failed cleanly | lost
    detail: str = ""


@dataclass
class Fault:
    kind: str
    worker: str
    started: float
    ended: float = 0.0
    detail: str = ""


@dataclass
class Soak:
    outcomes: list[Outcome] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def client_loop(
    url: str, expected: list[str], soak: Soak, stop: threading.Event, seed: int, args
) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        index = rng.randrange(len(PROMPTS))
        started = time.monotonic()
        try:
            status, text = ask(url, PROMPTS[index], args.max_tokens, args.request_timeout)
        except Exception as exc:  # a hang, a dropped HTTP connection: lost
            status, text = 0, f"{type(exc).__name__}: {exc}"
        outcome = Outcome(index, started, time.monotonic(), status)
        if status == 200:
            same = text == expected[index]
            outcome.verdict = "ok" if same else "lost"
            outcome.detail = "" if same else f"text differs: {text!r}"
        elif status in (429, 502, 503) and text:
            outcome.verdict, outcome.detail = "failed cleanly", text
        else:
            outcome.verdict, outcome.detail = "lost", f"HTTP {status}: {text}"
        with soak.lock:
            soak.outcomes.append(outcome)


def injector_loop(cluster: Cluster, soak: Soak, stop: threading.Event, args) -> None:
    rng = random.Random(args.seed)
    names = sorted(cluster.workers)
    while not stop.wait(rng.uniform(args.gap_s * 0.5, args.gap_s * 1.5)):
        name = rng.choice(names)
        # The first worker is never killed, so that its files and memory can be compared.
        kind = rng.choice(["freeze", "drop"] if name == names[0] else ["kill", "freeze", "drop"])
        fault = Fault(kind, name, time.monotonic())
        try:
            if kind == "kill":
                fault.detail = cluster.kill_and_restart(name, rng.uniform(0.2, 2.0))
            elif kind == "freeze":
                # Two thirds shorter than the retry timeout (must recover), a third longer.
                fault.detail = cluster.freeze(name, rng.uniform(0.3, 1.5 * args.retry_timeout))
            else:
                fault.detail = cluster.drop(name)
        except Exception as exc:
            fault.detail = f"injection failed: {exc}"
        fault.ended = time.monotonic()
        with soak.lock:
            soak.faults.append(fault)
        print(f"  fault: {kind} {name}: {fault.detail}", file=sys.stderr)


def resources(pids: dict[str, int]) -> dict[str, dict[str, float]]:
    found = {}
    for label, pid in pids.items():
        try:
            process = psutil.Process(pid)
            found[label] = {
                "fds": process.num_fds(),
                "rss_mb": process.memory_info().rss / 2**20,
            }
        except psutil.Error:
            pass
    return found


# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    model = resolve_model_path(args.model or default_model())
    args.scratch.mkdir(parents=True, exist_ok=True)
    print(f"starting {args.workers} workers and the API ({model.name})", file=sys.stderr)
    cluster = Cluster(model, args.scratch, args.workers, args)
    try:
        expected = [ask(cluster.url, p, args.max_tokens, 300) for p in PROMPTS]
        if any(status != 200 for status, _ in expected):
            raise SystemExit(f"fault-free requests failed: {expected}")
        reference = [text for _, text in expected]
        before = resources(cluster.processes())
        soak, stop = Soak(), threading.Event()
        threads = [
            threading.Thread(target=client_loop, args=(cluster.url, reference, soak, stop, i, args))
            for i in range(args.clients)
        ]
        injector = threading.Thread(target=injector_loop, args=(cluster, soak, stop, args))
        timeline: list[dict] = []  # RSS of the compared processes over the run: a leak climbs

        def sample() -> None:
            while not stop.wait(args.sample_s):
                found = resources(cluster.processes())
                timeline.append(
                    {label: round(v["rss_mb"], 1) for label, v in found.items() if label in before}
                )

        threads.append(threading.Thread(target=sample))
        started = time.monotonic()
        for thread in [*threads, injector]:
            thread.start()
        print(f"soaking for {args.minutes:g} min", file=sys.stderr)
        time.sleep(args.minutes * 60)
        stop.set()
        injector.join()
        for thread in threads:
            thread.join()
        soaked = time.monotonic() - started
        time.sleep(args.settle_s)  # idle links, closed sessions: then count what is left
        after_ok = [
            ask(cluster.url, p, args.max_tokens, 300) == (200, t)
            for p, t in zip(PROMPTS, reference, strict=True)
        ]
        after = resources(cluster.processes())
    finally:
        cluster.stop()

    for outcome in soak.outcomes:
        overlapped = any(
            f.started < outcome.ended and outcome.started < f.ended for f in soak.faults
        )
        if outcome.verdict == "ok" and overlapped:
            outcome.verdict = "recovered"
    verdicts = Counter(o.verdict for o in soak.outcomes)
    leaks = {
        label: {
            "fds": [before[label]["fds"], after[label]["fds"]],
            "rss_mb": [round(before[label]["rss_mb"], 1), round(after[label]["rss_mb"], 1)],
        }
        for label in before
        if label in after
    }
    fd_leak = any(v["fds"][1] > v["fds"][0] + FD_SLACK for v in leaks.values())
    summary = {
        "model": model.name,
        "minutes": round(soaked / 60, 2),
        "workers": args.workers,
        "clients": args.clients,
        "retry_timeout_s": args.retry_timeout,
        "heartbeat_timeout_s": args.heartbeat_timeout,
        "requests": len(soak.outcomes),
        "faults_injected": dict(Counter(f.kind for f in soak.faults)),
        "ok_untouched": verdicts["ok"],
        "recovered": verdicts["recovered"],
        "failed_cleanly": verdicts["failed cleanly"],
        "lost": verdicts["lost"],
        "healthy_after": all(after_ok),
        "processes": leaks,
        "fd_leak": fd_leak,
        "rss_mb_every_sample": timeline,
        "lost_examples": [asdict(o) for o in soak.outcomes if o.verdict == "lost"][:10],
        "clean_failure_examples": sorted(
            {o.detail for o in soak.outcomes if o.verdict == "failed cleanly"}
        )[:5],
        "faults": [asdict(f) for f in soak.faults],
    }
    return summary


def markdown(summary: dict) -> str:
    faults = ", ".join(f"{n} {k}" for k, n in summary["faults_injected"].items()) or "none"
    lines = [
        f"Soak: {summary['minutes']} min, {summary['clients']} clients, {summary['workers']} "
        f"workers ({summary['model']}), --retry-timeout {summary['retry_timeout_s']:g}s, "
        f"--heartbeat-timeout {summary['heartbeat_timeout_s']:g}s",
        "",
        "| requests | faults injected | recovered | failed cleanly | lost | untouched ok |",
        "|---:|---|---:|---:|---:|---:|",
        f"| {summary['requests']} | {faults} | {summary['recovered']} | "
        f"{summary['failed_cleanly']} | {summary['lost']} | {summary['ok_untouched']} |",
        "",
        "| process | open fds (start → end) | RSS MB (start → end) |",
        "|---|---|---|",
    ]
    for label, values in summary["processes"].items():
        fds, rss = values["fds"], values["rss_mb"]
        lines.append(f"| {label} | {fds[0]} → {fds[1]} | {rss[0]} → {rss[1]} |")
    timeline = summary.get("rss_mb_every_sample") or []
    for label in summary["processes"]:
        series = [sample[label] for sample in timeline if label in sample]
        if series:
            lines.append(f"\nRSS MB of {label} every sample: {' '.join(f'{v:g}' for v in series)}")
    lines.append("")
    lines.append(f"Cluster healthy after the soak: {'yes' if summary['healthy_after'] else 'NO'}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder or .gguf (default: SmolLM2-135M GGUF)")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--gap-s", type=float, default=6.0, help="mean seconds between faults")
    parser.add_argument("--retry-timeout", type=float, default=20.0)
    parser.add_argument("--heartbeat-timeout", type=float, default=2.0)
    parser.add_argument("--request-timeout", type=float, default=180.0)
    parser.add_argument("--settle-s", type=float, default=5.0)
    parser.add_argument("--sample-s", type=float, default=30.0, help="RSS sampling period")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/cake-soak"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    summary = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(summary, indent=2))
    (args.out / "soak.md").write_text(markdown(summary))
    print(markdown(summary))
    if summary["lost"] or summary["fd_leak"] or not summary["healthy_after"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
