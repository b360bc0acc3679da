"""The OpenAI-compatible HTTP API, driven by the official `openai` client over loopback.

Servers run either as `python -m cake.cli --api 127.0.0.1:0` (a subprocess, as users run it) or
in a background thread with its own event loop (so that tests can look at the workers' sessions
and slow a stage down). Expected texts come from the CLI or from `Master.generate` directly.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from api_server import (
    API_KEY,
    MAX_SEQ_LEN,
    ApiProcess,
    GenerationLog,
    Server,
    ThrottledStage,
    api_in_thread,
    chat,
    post,
)
from helpers import build_random_llama, llama3_tokenizer_path, wait_until

from cake.cluster.local_cluster import start_local_cluster
from cake.decoding.sampling import SamplingParams
from cake.decoding.stats import GenerationStats
from cake.faces.api import model_id
from cake.master import Master, MasterSettings
from cake.model.detokenizer import StopFilter
from cake.model.tokenizer import load_tokenizer
from cake.worker import Worker

TWO_WORKERS = {"w1": ["model.layers.0-1"], "w2": ["model.layers.2-3"]}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cake.cli", *args]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def served(tiny_llama: Path) -> Iterator[Server]:
    """The tiny model on the master alone, behind an API key."""
    with api_in_thread(tiny_llama, api_key=API_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def reference(tiny_llama: Path) -> Iterator[Callable[[list[int], int], list[int]]]:
    """Greedy token ids straight from Master.generate (no HTTP), as the API should give."""
    master = asyncio.run(
        Master.open(MasterSettings(tiny_llama, device="cpu", dtype="f32", max_seq_len=MAX_SEQ_LEN))
    )

    def greedy(prompt_ids: list[int], n: int) -> list[int]:
        async def run() -> list[int]:
            greedy_params = SamplingParams(temperature=0)
            return [t async for t in master.generate(prompt_ids, greedy_params, n)]

        return asyncio.run(run())

    yield greedy
    asyncio.run(master.close())


def streamed_chat(
    client: openai.OpenAI, model: str, prompt: str, max_tokens: int, **kw: Any
) -> list:
    return list(chat(client, model, prompt, max_tokens, stream=True, **kw))


def chunk_text(chunks: list) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# ---------------------------------------------------------------- the CLI's server


@pytest.mark.slow
def test_cli_api_server_gives_the_cli_greedy_output(
    tiny_llama: Path, reference: Callable[[list[int], int], list[int]]
) -> None:
    """`cake-cli --api 127.0.0.1:0` as a process: a chat, streamed and not, equals the text
    `cake-cli --prompt P --temperature 0 -n N` prints; a completion equals Master.generate."""
    prompt, raw_prompt, n = "tell me a story", "Once upon a time", 24
    model = ["--model", str(tiny_llama), "--device", "cpu"]
    cli_run = subprocess.Popen(
        cli(*model, "--prompt", prompt, "--temperature", "0", "-n", str(n)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = ApiProcess(cli(*model, "--api", "127.0.0.1:0"), timeout=120)
    try:
        assert server.url, "the API server did not start:\n" + "".join(server.lines)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0)
        name, tokenizer = model_id(tiny_llama), load_tokenizer(tiny_llama)
        assert [m.id for m in client.models.list()] == [name]
        stdout, stderr = cli_run.communicate(timeout=120)
        assert cli_run.returncode == 0, stderr
        assert stdout.endswith("\n")
        expected = stdout[:-1]
        assert expected

        reply = chat(client, name, prompt, n)
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].message.role == "assistant"
        assert chunk_text(streamed_chat(client, name, prompt, n)) == expected

        # The completions endpoint encodes its prompt as --raw does.
        tokens = reference(tokenizer.encode(raw_prompt), n)
        expected = tokenizer.decode(tokens, skip_special_tokens=True)
        completion = client.completions.create(
            model=name, prompt=raw_prompt, temperature=0, max_tokens=n
        )
        assert completion.choices[0].text == expected
        stream = client.completions.create(
            model=name, prompt=raw_prompt, temperature=0, max_tokens=n, stream=True
        )
        assert "".join(c.choices[0].text for c in stream) == expected
    finally:
        out = server.stop()
    assert out == "", "the API server wrote to stdout"
    assert server.process.returncode in (0, 130), "".join(server.lines)


# ---------------------------------------------------------------- one server, many checks


def test_text_and_usage_equal_master_generate(served: Server, reference: Callable) -> None:
    client, tokenizer, n = served.client(), served.master.tokenizer, 16
    prompt_ids = served.master.encode("tell me a story")
    tokens = reference(prompt_ids, n)
    text = tokenizer.decode(tokens, skip_special_tokens=True)

    reply = chat(client, served.model, "tell me a story", n)
    assert reply.object == "chat.completion"
    assert reply.model == served.model
    assert reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == ("length" if len(tokens) == n else "stop")
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == len(tokens)
    assert reply.usage.total_tokens == len(prompt_ids) + len(tokens)

    chunks = streamed_chat(
        client, served.model, "tell me a story", n, stream_options={"include_usage": True}
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunk_text(chunks) == text
    *_, last, usage = chunks
    assert last.choices[0].finish_reason == reply.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert usage.choices == []
    assert usage.usage.model_dump(include={"prompt_tokens", "completion_tokens"}) == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": len(tokens),
    }

    # Completions: the prompt is encoded as --raw does, BOS and no template.
    raw_ids = tokenizer.encode("Once upon a time")
    tokens = reference(raw_ids, n)
    completion = client.completions.create(
        model=served.model, prompt="Once upon a time", temperature=0, max_tokens=n
    )
    assert completion.object == "text_completion"
    assert completion.choices[0].text == tokenizer.decode(tokens, skip_special_tokens=True)
    assert completion.usage.prompt_tokens == len(raw_ids)
    assert completion.usage.completion_tokens == len(tokens)
    # Token ids are a prompt too.
    by_ids = client.completions.create(
        model=served.model, prompt=raw_ids, temperature=0, max_tokens=n
    )
    assert by_ids.choices[0].text == completion.choices[0].text


def test_sampling_follows_seed_and_openai_default_temperature(served: Server) -> None:
    client, messages = served.client(), [{"role": "user", "content": "tell me a story"}]

    def sample(**kw: Any) -> str:
        reply = client.chat.completions.create(
            model=served.model, messages=messages, max_tokens=12, **kw
        )
        return reply.choices[0].message.content

    seeded = sample(seed=7, temperature=1.0)
    assert sample(seed=7) == seeded  # no temperature: OpenAI's default, 1.0
    assert sample(seed=7, temperature=1.0) == seeded
    assert sample(seed=7, temperature=0.5, top_p=0.9) != seeded
    assert chat(client, served.model, "tell me a story", 12).choices[0].message.content != seeded


def test_system_and_assistant_turns_use_the_chat_template(served: Server) -> None:
    from cake.model.tokenizer import encode_chat

    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and now?"},
    ]
    reply = served.client().chat.completions.create(
        model=served.model, messages=messages, temperature=0, max_tokens=2
    )
    assert reply.usage.prompt_tokens == len(encode_chat(served.master.tokenizer, messages))


def test_stop_string_cuts_the_text(served: Server, reference: Callable) -> None:
    client, tokenizer, n = served.client(), served.master.tokenizer, 24
    prompt_ids = served.master.encode("tell me a story")
    tokens = reference(prompt_ids, n)
    texts = [tokenizer.decode(tokens[:k], skip_special_tokens=True) for k in range(n + 1)]
    full = texts[-1]
    # A stop string from the middle of the text that ends in a visible character.
    start = len(full) // 2
    while not full[start + 2].strip():
        start += 1
    stop = full[start : start + 3]
    expected = full[: full.index(stop)]
    tokens_to_stop = next(k for k, text in enumerate(texts) if stop in text)
    assert 0 < tokens_to_stop < n

    reply = chat(client, served.model, "tell me a story", n, stop=["never seen", stop])
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == tokens_to_stop

    chunks = streamed_chat(
        client,
        served.model,
        "tell me a story",
        n,
        stop=stop,
        stream_options={"include_usage": True},
    )
    assert chunk_text(chunks) == expected
    assert all(stop not in (c.choices[0].delta.content or "") for c in chunks if c.choices)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == tokens_to_stop

    raw = client.completions.create(
        model=served.model, prompt=prompt_ids, temperature=0, max_tokens=n, stop=stop
    )
    assert raw.choices[0].text == expected
    assert raw.choices[0].finish_reason == "stop"


def sse_payloads(server: Server, path: str, body: dict) -> list[str]:
    """The `data:` payloads of a streamed response, in order, as sent (`[DONE]` included)."""
    request = urllib.request.Request(
        f"{server.url}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = response.read().decode().split("\n\n")
    assert events[-1] == ""  # every event ends with a blank line
    assert all(event.startswith("data: ") for event in events[:-1]), events
    return [event.removeprefix("data: ") for event in events[:-1]]


def test_streamed_completion_ends_with_its_usage(served: Server, reference: Callable) -> None:
    """/v1/completions with stream_options.include_usage: every chunk says usage null, the
    last one before [DONE] has no choices and the exact counts."""
    tokenizer, n = served.master.tokenizer, 16
    prompt_ids = tokenizer.encode("Once upon a time")
    tokens = reference(prompt_ids, n)
    body = {"model": served.model, "prompt": "Once upon a time", "temperature": 0,
            "max_tokens": n, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    *chunks, usage, done = sse_payloads(served, "/v1/completions", body)
    assert done == "[DONE]"
    chunks = [json.loads(chunk) for chunk in chunks]
    assert all(chunk["usage"] is None for chunk in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == tokenizer.decode(
        tokens, skip_special_tokens=True
    )
    assert chunks[-1]["choices"][0]["finish_reason"] == ("length" if len(tokens) == n else "stop")
    last = json.loads(usage)
    assert last["object"] == "text_completion"
    assert last["id"] == chunks[0]["id"]
    assert last["choices"] == []
    # The server's earlier requests began the same way: part of the prompt came from its cache.
    cached = last["usage"].pop("prompt_tokens_details")["cached_tokens"]
    assert 0 <= cached < len(prompt_ids)
    assert last["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": len(tokens),
        "total_tokens": len(prompt_ids) + len(tokens),
    }
    # Without include_usage: no usage anywhere.
    del body["stream_options"]
    *chunks, done = sse_payloads(served, "/v1/completions", body)
    assert done == "[DONE]"
    assert all("usage" not in json.loads(chunk) for chunk in chunks)


def test_cake_draft_drafts_per_request(tiny_llama: Path) -> None:
    """A server started with --draft lookup --draft-tokens 3: a request drafts by default,
    and with cake_draft: "lookup" and N tokens per round; cake_draft: "none" does not. The
    drafting is read from the master's GenerationStats of each request (drafted, accepted,
    fewer decode steps than tokens), and every text is the one plain decoding gives."""
    log: list[GenerationLog] = []
    with api_in_thread(
        tiny_llama,
        prepare=lambda master: log.append(GenerationLog(master)),
        master_options={"draft": "lookup", "draft_tokens": 3},
    ) as server:
        client, hi = server.client(), server.master.tokenizer.encode("hi")
        # "hi" and 30 of the model's own greedy tokens: its text goes on to repeat itself, so
        # lookup finds drafts, and some are right.
        prompt = hi + server.greedy(hi, 30)

        def complete(**extra: object) -> tuple[str, GenerationStats]:
            reply = client.completions.create(
                model=server.model, prompt=prompt, max_tokens=24, temperature=0, extra_body=extra
            )
            assert reply.usage.completion_tokens == log[0].stats[-1].new_tokens
            return reply.choices[0].text, log[0].stats[-1]

        plain, undrafted = complete(cake_draft="none")
        assert undrafted.drafted == undrafted.accepted == 0
        assert undrafted.decode_steps == undrafted.decode_tokens  # one token per step
        for extra in ({}, {"cake_draft": "lookup", "cake_draft_tokens": 4}):
            text, stats = complete(**extra)
            assert text == plain
            assert stats.drafted > 0, extra
            assert 0 < stats.accepted <= stats.drafted, extra
            assert stats.decode_steps < stats.decode_tokens, extra  # accepted drafts saved steps
        assert len(log[0].stats) == 1 + 3  # server.greedy's, then the requests'


@pytest.mark.parametrize(
    ("stops", "text", "expected"),
    [
        (["</s>"], "hello </s> world", "hello "),
        (["ab"], "xaab", "xa"),
        (["abc", "xyz"], "aabxyabc", "aabxy"),  # "ab", then "xy" held back, then released
        (["END"], "no stop here, EN", "no stop here, EN"),  # held back, then flushed
        (["\n\n"], "one\ntwo\n\nthree", "one\ntwo"),
        ([], "anything", "anything"),
    ],
)
def test_stop_filter_never_emits_a_stop_string(stops: list[str], text: str, expected: str) -> None:
    for size in range(1, len(text) + 1):  # the same text in pieces of every size
        stop_filter = StopFilter(stops)
        emitted = [stop_filter.push(text[i : i + size]) for i in range(0, len(text), size)]
        emitted.append(stop_filter.flush())
        assert "".join(emitted) == expected
        assert not any(stop in piece for piece in emitted for stop in stops)


def test_models_and_health(served: Server) -> None:
    client = served.client()
    assert client.models.retrieve(served.model).id == served.model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    # Without the key: up or not, and nothing about the model or the workers.
    with urllib.request.urlopen(f"{served.url}/health", timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok"}
    keyed = urllib.request.Request(
        f"{served.url}/health", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    with urllib.request.urlopen(keyed, timeout=10) as response:
        health = json.loads(response.read())
    assert health["status"] == "ok"
    assert health["model"] == served.model
    assert health["stages"] == [{"stage": "master", "blocks": "0-3", "connected": True}]


def test_errors_have_their_status_and_openai_shape(served: Server) -> None:
    client = served.client()
    shape = {"message", "type", "param", "code"}

    with pytest.raises(openai.NotFoundError) as caught:
        chat(client, "llama-70b", "hi", 2)
    assert set(caught.value.body) == shape
    assert caught.value.body["code"] == "model_not_found"
    assert served.model in caught.value.body["message"]

    with pytest.raises(openai.BadRequestError, match="n=2 is not supported") as caught:
        chat(client, served.model, "hi", 2, n=2)
    assert caught.value.body["param"] == "n"

    with pytest.raises(openai.BadRequestError, match=r"\d+ tokens.*context holds 256") as caught:
        chat(client, served.model, "hello " * 300, 2)
    assert caught.value.body["code"] == "context_length_exceeded"

    with pytest.raises(openai.BadRequestError, match="temperature") as caught:
        chat(client, served.model, "hi", 2, extra_body={"temperature": 7})
    assert caught.value.body["param"] == "temperature"

    with pytest.raises(openai.AuthenticationError, match="incorrect API key") as caught:
        served.client(api_key="wrong").models.list()
    assert set(caught.value.body) == shape

    # What no OpenAI client sends: a request without a key, a body that is not JSON.
    url = f"{served.url}/v1/chat/completions"
    json_type = {"Content-Type": "application/json"}
    good = json.dumps({"model": served.model, "messages": [{"role": "user", "content": "hi"}]})
    status, body = post(url, good.encode(), json_type)
    assert status == 401
    assert "missing API key" in body["error"]["message"]
    authorized = {**json_type, "Authorization": f"Bearer {API_KEY}"}
    status, body = post(url, b'{"model": "x", "messages": [', authorized)
    assert status == 400
    assert set(body["error"]) == shape
    assert "not valid JSON" in body["error"]["message"]
    status, body = post(url, b'{"messages": [{"role": "robot", "content": "hi"}]}', authorized)
    assert status == 400
    assert body["error"]["param"] == "messages.0.role"
    # The server still serves.
    assert chat(client, served.model, "hi", 2).usage.completion_tokens >= 1


# ---------------------------------------------------------------- sessions and workers


@pytest.fixture(scope="module")
def pipelined_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Blocks wide enough that a step's compute (~1 ms) outlasts the hops between stages, so
    overlapping compute on two workers is visible; the Llama 3.2 tokenizer only to decode (the
    vocabulary is its first 256 ids: prompts go in as token ids)."""
    folder = build_random_llama(
        tmp_path_factory.mktemp("pipelined_llama"),
        hidden=512, intermediate=2048, heads=8, kv_heads=2, vocab=256,
    )  # fmt: skip
    for path in llama3_tokenizer_path().iterdir():
        if path.is_file():
            shutil.copy(path, folder / path.name)
    return folder


Interval = tuple[str, frozenset[str], float, float]  # worker, sessions, start, end


class ComputeLog:
    """When each worker computed which sessions' rows: (worker, sessions, start, end), in
    seconds of one clock, recorded on the workers' compute threads."""

    def __init__(self, workers: dict[str, Worker]) -> None:
        self.intervals: list[Interval] = []
        for worker in workers.values():
            worker.requests.run_request = self._timed(worker.name, worker.requests.run_request)
            worker.requests.run_batch = self._timed(
                worker.name, worker.requests.run_batch, batch=True
            )

    def _timed(self, name: str, run: Callable, batch: bool = False) -> Callable:
        def timed(first: Any, second: Any) -> Any:
            request = first if batch else second
            sessions = frozenset(request.sessions if batch else (request.session,))
            started = time.perf_counter()
            try:
                return run(first, second)
            finally:
                self.intervals.append((name, sessions, started, time.perf_counter()))

        return timed

    def rows(self, intervals: list[Interval]) -> int:
        return sum(len(sessions) for _, sessions, _, _ in intervals)


def overlaps(intervals: list[Interval], a: str, b: str) -> int:
    """Pairs of forwards of different sessions that workers `a` and `b` computed at once."""
    on_a = [i for i in intervals if i[0] == a]
    on_b = [i for i in intervals if i[0] == b]
    return sum(
        1
        for _, sessions_a, start_a, end_a in on_a
        for _, sessions_b, start_b, end_b in on_b
        if not sessions_a & sessions_b and start_a < end_b and start_b < end_a
    )


def test_concurrent_streams_pipeline_real_compute_through_two_workers(
    pipelined_llama: Path, tmp_path: Path
) -> None:
    """Four streams at once: each gets its solo output, they share steps (fewer forwards than
    rows), and the two workers compute different sessions' steps at the same time (w1 runs one
    group's step while w2 runs the other's), which one request at a time never does. No
    sleeping stand-in: the overlap is the blocks' compute, recorded on the workers' compute
    threads."""
    n = 24
    prompts = [[1, 2, 3], [40, 41], [7, 8, 9, 10, 11], [100]]
    with api_in_thread(pipelined_llama, tmp_path, TWO_WORKERS) as server:

        async def stream(client: openai.AsyncOpenAI, prompt: list[int]) -> str:
            chunks = await client.completions.create(
                model=server.model, prompt=prompt, temperature=0, max_tokens=n, stream=True
            )
            return "".join([c.choices[0].text async for c in chunks])

        # In-process workers share this thread's event loop: computing inline there (what a
        # worker process does for a lone decode step) would serialise them, as two worker
        # processes never are. Their compute threads run side by side.
        for worker in server.workers.values():
            worker.requests.compute_mode = "thread"

        async def run() -> tuple[list[str], list[str], ComputeLog, int]:
            client = server.async_client()
            await stream(client, [5])  # warm up
            log = ComputeLog(server.workers)
            solo = [await stream(client, prompt) for prompt in prompts]
            solo_forwards = len(log.intervals)
            together = await asyncio.gather(*(stream(client, p) for p in prompts))
            return solo, together, log, solo_forwards

        solo, together, log, solo_forwards = asyncio.run(run())
        wait_until(lambda: all(w.session_count == 0 for w in server.workers.values()))
    assert together == solo
    assert len(set(solo)) == len(prompts)
    steps = 2 * len(prompts) * n  # every step of every stream, on both workers
    assert solo_forwards == steps == log.rows(log.intervals[:solo_forwards])
    together_forwards = log.intervals[solo_forwards:]
    assert log.rows(together_forwards) == steps
    assert len(together_forwards) < steps  # streams shared steps
    # One session at a time: the workers never compute at once. Together: they do.
    assert overlaps(log.intervals[:solo_forwards], "w1", "w2") == 0
    overlapping = overlaps(log.intervals[solo_forwards:], "w1", "w2")
    print(f"{overlapping} pairs of forwards of different sessions computed at the same time")
    assert overlapping > 0


def test_a_client_that_goes_away_frees_its_session(tiny_llama: Path, tmp_path: Path) -> None:
    throttles: list[ThrottledStage] = []

    def slow_down(master: Master) -> None:  # 20 ms per step: 200 tokens would take 4 s
        throttles.append(ThrottledStage(master.pipeline.stages[0], delay=0.02))
        master.pipeline.stages[0] = throttles[0]

    with api_in_thread(tiny_llama, tmp_path, TWO_WORKERS, slow_down) as server:
        stream = chat(server.client(), server.model, "tell me a story", 200, stream=True)
        chunks = iter(stream)
        for _ in range(3):
            next(chunks)
        assert all(w.session_count == 1 for w in server.workers.values())
        stream.close()  # the client hangs up mid-stream
        wait_until(lambda: all(w.session_count == 0 for w in server.workers.values()), 2)
        wait_until(lambda: not server.service.running, 2)
        # No request is running: the generation's task has ended, its forwards are all done.
        assert throttles[0].forwards < 100, "the generation went on"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_a_client_gone_during_a_long_prefill_frees_its_session_everywhere(
    tiny_llama: Path, tmp_path: Path, stream: bool
) -> None:
    """A 100-token prompt goes through in 7 steps of 16 positions. The client hangs up while
    the second step waits at a gate: the session is then closed on both workers and on the
    master (which runs block 3), the generation stops, and the next request gets its text."""
    gate: list[asyncio.Event] = []
    throttles: list[ThrottledStage] = []

    def beyond_first_chunk(rows: Any) -> bool:
        return any(row.start_pos > 0 for row in rows)

    def hold(master: Master) -> None:
        gate.append(asyncio.Event())
        throttled = ThrottledStage(master.pipeline.stages[0], gate=gate[0], hold=beyond_first_chunk)
        throttles.append(throttled)
        master.pipeline.stages[0] = throttled

    layers = {"w1": ["model.layers.0-1"], "w2": ["model.layers.2"]}  # block 3: the master's
    options = {"step_positions": 16}
    with api_in_thread(tiny_llama, tmp_path, layers, hold, master_options=options) as server:
        workers = server.workers.values()
        prompt = [(7 * i) % 200 + 1 for i in range(100)]
        body = json.dumps({"prompt": prompt, "max_tokens": 150, "temperature": 0,
                           "stream": stream}).encode()  # fmt: skip
        host, port = server.url.removeprefix("http://").split(":")
        try:
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(
                    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                server.until(lambda: throttles[0].held == 1)  # 16 positions went through
                assert [w.session_count for w in workers] == [1, 1]
                assert server.master_sessions() == 1
        finally:
            server.call_soon(gate[0].set)  # the client is gone; the prefill may go on

        server.until(lambda: all(w.session_count == 0 for w in workers))
        server.until(lambda: server.master_sessions() == 0 and not server.service.running)
        prefill_steps = -(-len(prompt) // 16)
        # The prefill's other steps may run (the client's leaving is seen once the first
        # token is out), the 150 tokens do not.
        assert throttles[0].forwards < prefill_steps + 75, "the generation went on"

        # The next request, the same prompt: its normal text.
        expected = server.master.tokenizer.decode(
            server.greedy(prompt, 8), skip_special_tokens=True
        )
        reply = server.client().completions.create(
            model=server.model, prompt=prompt, temperature=0, max_tokens=8
        )
        assert reply.choices[0].text == expected
        assert reply.usage.prompt_tokens == len(prompt)
    assert all(w.session_count == 0 for w in workers)


def test_max_concurrent_answers_429(tiny_llama: Path) -> None:
    gate: list[asyncio.Event] = []

    def hold(master: Master) -> None:
        gate.append(asyncio.Event())
        master.pipeline.stages[0] = ThrottledStage(master.pipeline.stages[0], gate=gate[0])

    with api_in_thread(tiny_llama, prepare=hold, api_key=API_KEY, max_concurrent=1) as server:
        client = server.client()
        first: list[Any] = []
        waiting = threading.Thread(target=lambda: first.append(chat(client, server.model, "hi", 4)))
        waiting.start()
        wait_until(lambda: len(server.service.running) == 1)
        with pytest.raises(openai.RateLimitError, match="max-concurrent") as caught:
            chat(client, server.model, "hello", 4)
        assert caught.value.status_code == 429
        assert set(caught.value.body) == {"message", "type", "param", "code"}
        server.call_soon(gate[0].set)
        waiting.join(30)
        assert first and first[0].usage.completion_tokens >= 1
        wait_until(lambda: not server.service.running)
        assert chat(client, server.model, "hello", 4).usage.completion_tokens >= 1


@pytest.mark.slow
def test_a_worker_gone_for_good_ends_the_stream_with_an_error(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """Worker processes; w2 is killed mid-stream and does not come back within
    --retry-timeout: the stream ends with an error event (no finish_reason, no [DONE]), the
    next request gets 502, and /health says 503."""
    topology = tmp_path / "topology.yml"
    processes = {w.name: w for w in start_local_cluster(tiny_llama, TWO_WORKERS, topology)}

    def slow_down(master: Master) -> None:
        master.pipeline.stages[0] = ThrottledStage(master.pipeline.stages[0], delay=0.02)

    try:
        with api_in_thread(
            tiny_llama,
            prepare=slow_down,
            topology=topology,
            master_options={"retry_timeout": 0.5},
        ) as server:
            client = server.client()
            chunks = iter(chat(client, server.model, "tell me a story", 200, stream=True))
            seen = [next(chunks), next(chunks)]
            processes["w2"].kill()
            with pytest.raises(openai.APIError, match=r"w2.*did not come back"):
                seen.extend(chunks)
            assert all(c.choices[0].finish_reason is None for c in seen)  # no fake finish

            with pytest.raises(openai.APIStatusError, match="w2") as caught:
                chat(client, server.model, "hi", 4)
            assert caught.value.status_code == 502
            assert caught.value.body["type"] == "server_error"
            with pytest.raises(urllib.error.HTTPError) as failed:
                urllib.request.urlopen(f"{server.url}/health", timeout=10)
            assert failed.value.code == 503
            health = json.loads(failed.value.read())
            assert [s["connected"] for s in health["stages"]] == [True, False]
    finally:
        for process in processes.values():
            process.stop()


# ---------------------------------------------------------------- a real model


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smollm2_dir: Path) -> None:
    with api_in_thread(smollm2_dir) as server:
        client = server.client()
        reply = chat(client, server.model, "What is the capital of France?", 24)
        assert "Paris" in reply.choices[0].message.content
        streamed = streamed_chat(client, server.model, "What is the capital of France?", 24)
        assert chunk_text(streamed) == reply.choices[0].message.content
