"""The API server for tests: create_app + uvicorn in a background thread, and small clients.

The server runs in a thread with its own event loop (so that tests can look at the workers'
sessions and change the master's stages); `call_soon` runs code on that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import openai
from cluster import cluster
from helpers import until

from cake.decoding.sampling import SamplingParams
from cake.decoding.stats import GenerationStats
from cake.engine.stages import StageRow
from cake.faces.api import create_app, listen, model_id, server_for
from cake.master import Master, MasterSettings
from cake.worker import Worker

T = TypeVar("T")

API_KEY = "sekret-key"
MAX_SEQ_LEN = 256  # the in-process workers of `cluster` hold 256 positions


class ApiProcess:
    """`cake-cli ... --api 127.0.0.1:0` as a process, as users run it: its stderr lines are
    collected as they come, `url` is where it listens (None if it did not start in time)."""

    def __init__(self, command: list[str], timeout: float) -> None:
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        ready = threading.Event()
        self.drainer = threading.Thread(target=self._drain, args=(ready,), daemon=True)
        self.drainer.start()
        ready.wait(timeout)
        match = re.search(r"API on (http://127\.0\.0\.1:\d+)", "".join(self.lines))
        self.url = match[1] if match else None

    def _drain(self, ready: threading.Event) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if "API on http://" in line:
                ready.set()
        ready.set()

    def stop(self) -> str:
        """SIGINT, as Ctrl-C would (killed after 30 s); what it wrote to stdout."""
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.drainer.join(5)
        assert self.process.stdout is not None
        return self.process.stdout.read()


@dataclass
class Server:
    url: str
    model: str
    master: Master
    workers: dict[str, Worker]
    service: Any  # cake.faces.api.service.Service
    loop: asyncio.AbstractEventLoop
    loop_thread_name: str  # the thread that runs the event loop

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=60
        )

    def call_soon(self, fn: Callable[[], Any]) -> None:
        """Run fn on the server's event loop (where its links and events live)."""
        self.loop.call_soon_threadsafe(fn)

    def on_loop(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a coroutine on the server's event loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def until(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """`until(condition)` on the server's loop, where the sessions it looks at change."""
        self.on_loop(until(condition, timeout), timeout + 5)

    def greedy(self, prompt_ids: list[int], n: int, ignore_eos: bool = False) -> list[int]:
        """Greedy token ids straight from the server's Master.generate (no HTTP, no stop
        strings): what a request with temperature 0 should answer."""

        async def run() -> list[int]:
            params = SamplingParams(temperature=0)
            return [t async for t in self.master.generate(prompt_ids, params, n, ignore_eos)]

        return self.on_loop(run())

    def master_sessions(self) -> int:
        """Sessions in use in the master's own stores (its local stages; cached prefixes
        not counted)."""
        local = [stage for stage in self.master.pipeline.stages if not stage.remote]
        stores = [stage.runner.store for stage in local]
        return sum(len(store) - store.cached_count() for store in stores)


@contextlib.contextmanager
def api_in_thread(
    folder: Path,
    tmp_path: Path | None = None,
    layers: dict[str, list[str]] | None = None,
    prepare: Callable[[Master], None] | None = None,
    topology: Path | None = None,
    master_options: dict[str, Any] | None = None,
    **app_options: Any,
) -> Iterator[Server]:
    """create_app + uvicorn on 127.0.0.1:<any> in a thread; in-process workers if `layers`,
    or the workers that `topology` names."""
    started = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        try:
            async with contextlib.AsyncExitStack() as stack:
                workers: dict[str, Worker] = {}
                where = topology
                if layers:
                    # Last on the way out: let the workers' connection handlers see the close,
                    # rather than be cancelled mid-read when the loop ends.
                    stack.push_async_callback(
                        until, lambda: not any(w.links for w in workers.values())
                    )
                    where, workers = await stack.enter_async_context(
                        cluster(folder, tmp_path, layers)
                    )
                # As `cake-cli --api` opens it: many sessions at once, sharing steps.
                settings = MasterSettings.serving(
                    model=folder,
                    topology=where,
                    device="cpu",
                    dtype="f32",
                    **{"max_seq_len": MAX_SEQ_LEN, **(master_options or {})},
                )
                master = await Master.open(settings)
                stack.push_async_callback(master.close)
                if prepare is not None:
                    prepare(master)
                app = create_app(master, model_name=model_id(folder), **app_options)
                stack.push_async_callback(app.state.service.close)
                sock = listen("127.0.0.1", 0)
                port = sock.getsockname()[1]
                box["uvicorn"] = uvicorn_server = server_for(app)
                box["server"] = Server(
                    f"http://127.0.0.1:{port}",
                    model_id(folder),
                    master,
                    workers,
                    app.state.service,
                    asyncio.get_running_loop(),
                    threading.current_thread().name,
                )
                started.set()
                await uvicorn_server.serve(sockets=[sock])
        finally:
            started.set()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    started.wait(120)
    if "server" not in box:
        thread.join(10)
        raise RuntimeError("the API server thread did not start (see its traceback above)")
    try:
        yield box["server"]
    finally:
        box["uvicorn"].should_exit = True
        thread.join(30)


class ThrottledStage:
    """Wraps a stage: waits for `gate` (if any; only for the forwards `hold(rows)` picks, if
    given) and `delay` seconds before each forward, and counts forwards and the rows they
    carried; everything else is the stage's own."""

    def __init__(
        self,
        stage: Any,
        delay: float = 0.0,
        gate: asyncio.Event | None = None,
        hold: Callable[[Sequence[StageRow]], bool] | None = None,
    ) -> None:
        self.stage, self.delay, self.gate, self.hold = stage, delay, gate, hold
        self.forwards = self.in_flight = self.most_in_flight = self.held = 0
        self.sessions_seen: list[set[str]] = []  # per forward, the sessions of its rows

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stage, name)

    async def forward(self, rows: Sequence[StageRow], hidden: Any) -> Any:
        self.forwards += 1
        self.sessions_seen.append({row.session_id for row in rows})
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.gate is not None and (self.hold is None or self.hold(rows)):
                self.held += 1
                try:
                    await self.gate.wait()
                finally:
                    self.held -= 1
            await asyncio.sleep(self.delay)  # a slow stage, not a synchronisation
            return await self.stage.forward(rows, hidden)
        finally:
            self.in_flight -= 1


class FailingStage:
    """Wraps a stage: once `arm`ed, lets `after` more forwards through, then raises `error` on
    every forward until `disarm`ed (a worker lost for good after some tokens)."""

    def __init__(self, stage: Any) -> None:
        self.stage = stage
        self.left: int | None = None  # forwards still let through; None: not armed
        self.error: Exception | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stage, name)

    def arm(self, after: int, error: Exception) -> None:
        self.left, self.error = after, error

    def disarm(self) -> None:
        self.left, self.error = None, None

    async def forward(self, rows: Sequence[StageRow], hidden: Any) -> Any:
        if self.left is not None and self.error is not None:
            if self.left == 0:
                raise self.error
            self.left -= 1
        return await self.stage.forward(rows, hidden)


class GenerationLog:
    """Wraps `master.generate`: the GenerationStats of every generation the service starts
    (prompt and new tokens, drafted and accepted tokens), in order."""

    def __init__(self, master: Master) -> None:
        self.stats: list[GenerationStats] = []
        generate = master.generate

        def logged(
            prompt_ids: Sequence[int],
            params: SamplingParams,
            max_new_tokens: int,
            ignore_eos: bool = False,
            stats: GenerationStats | None = None,
            draft: Any = None,
            **options: Any,  # grammar, logprobs
        ) -> AsyncIterator[int]:
            stats = GenerationStats() if stats is None else stats
            self.stats.append(stats)
            return generate(prompt_ids, params, max_new_tokens, ignore_eos, stats, draft, **options)

        master.generate = logged  # type: ignore[method-assign]


def chat(client: openai.OpenAI, model: str, prompt: str, max_tokens: int, **kw: Any) -> Any:
    messages = [{"role": "user", "content": prompt}]
    return client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=max_tokens, **kw
    )


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class ScriptedAnswers:
    """Wraps `master.generate`: each generation the service starts answers the next text of
    `answers` (its token ids, cut at max_new_tokens), and records its prompt ids; once the texts
    run out, the model answers. For tests of what the API makes of an answer (tool calls in
    every format) that no small model would write on cue."""

    def __init__(self, master: Master, answers: list[str] | None = None) -> None:
        self.answers = list(answers or [])
        self.prompts: list[list[int]] = []
        self.kwargs: list[dict[str, Any]] = []
        generate, tokenizer = master.generate, master.tokenizer

        def scripted(
            prompt_ids: Sequence[int],
            params: SamplingParams,
            max_new_tokens: int,
            ignore_eos: bool = False,
            stats: GenerationStats | None = None,
            draft: Any = None,
            **kwargs: Any,
        ) -> AsyncIterator[int]:
            self.prompts.append(list(prompt_ids))
            self.kwargs.append(kwargs)
            if not self.answers:
                return generate(
                    prompt_ids, params, max_new_tokens, ignore_eos, stats, draft, **kwargs
                )
            ids = tokenizer.encode(self.answers.pop(0), add_special_tokens=False)

            async def tokens() -> AsyncIterator[int]:
                if stats is not None:
                    stats.finish_reason = "length" if len(ids) > max_new_tokens else "stop"
                for token in ids[:max_new_tokens]:
                    yield token

            return tokens()

        master.generate = scripted  # type: ignore[method-assign]
