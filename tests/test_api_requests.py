"""What the API does with what clients send: every malformed, out-of-range or hostile request
is a 4xx with OpenAI's error body (never a 500) and the server goes on serving; the shapes real
clients send (content parts, max_completion_tokens, stop as string or list) work."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_server import API_KEY, MAX_SEQ_LEN, Server, ThrottledStage, api_in_thread, chat, post
from api_server import wait_for as wait_until

from cake.master import Master

SHAPE = {"message", "type", "param", "code"}
AUTH = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def served(tiny_llama: Path) -> Iterator[Server]:
    """The tiny model on the master alone, behind an API key, with a 64 KiB body limit."""
    with api_in_thread(tiny_llama, api_key=API_KEY, max_body_bytes=64 * 1024) as server:
        yield server


def send(server: Server, body: bytes | str, path: str = "/v1/chat/completions") -> tuple:
    raw = body.encode() if isinstance(body, str) else body
    return post(f"{server.url}{path}", raw, AUTH)


def chat_body(server: Server, **fields: Any) -> str:
    return json.dumps({"model": server.model, "messages": HI, "max_tokens": 2, **fields})


BAD_CHAT_FIELDS = [
    # (fields, the param the error names)
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**30}, "max_tokens"),  # beyond the context: 400, as OpenAI answers
    ({"max_tokens": MAX_SEQ_LEN}, "max_tokens"),  # fits alone, not with the prompt
    ({"max_tokens": "many"}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": None, "max_completion_tokens": 10**12}, "max_tokens"),
    ({"max_completion_tokens": -5}, "max_completion_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": -0.1}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"seed": 2**70}, "seed"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": None}, "messages"),
    ({"messages": {"role": "user", "content": "hi"}}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"content": "hi"}]}, "messages.0.role"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages.0.content",
    ),
    ({"messages": [{"role": "user", "content": "hello " * 300}]}, "messages"),  # > context
    ({"stop": ["x"] * 17}, "stop"),
    ({"stop": "x" * 1000}, "stop"),
    ({"stop": 5}, "stop"),
    ({"n": 3}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function"}]}, "tools"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_CHAT_FIELDS, ids=lambda v: str(v)[:40])
def test_bad_chat_fields_are_400_naming_the_field(served: Server, fields: dict, param: str) -> None:
    status, body = send(served, chat_body(served, **fields))
    assert status == 400, body
    assert set(body["error"]) == SHAPE
    assert body["error"]["param"].startswith(param), body
    assert body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b'{"model": "x", "messages": [', "not valid JSON"),
        (b"", "JSON object"),
        (b"[]", "JSON object"),
        (b'"hello"', "JSON object"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "finite"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', "finite"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}", ""),
        (b"[" * 20_000 + b"]" * 20_000, ""),  # deeper than the JSON parser recurses
        (b"\xff\xfe{not utf-8", ""),
    ],
    ids=["truncated", "empty", "array", "string", "nan", "infinity", "1e400", "huge-int",
         "deep", "bytes"],
)  # fmt: skip
def test_malformed_bodies_are_400(served: Server, raw: bytes, needle: str) -> None:
    status, body = send(served, raw)
    assert status == 400, body
    assert set(body["error"]) == SHAPE
    assert needle in body["error"]["message"]


@pytest.mark.parametrize(
    ("prompt", "param"),
    [
        ([-1], "prompt"),
        ([10**9], "prompt"),
        ([5] * (MAX_SEQ_LEN + 1), "prompt"),  # beyond the context
        ([[1, 2]], "prompt"),
        ({}, "prompt"),
        (None, "prompt"),
    ],
)
def test_bad_completion_prompts_are_400(served: Server, prompt: Any, param: str) -> None:
    raw = json.dumps({"model": served.model, "prompt": prompt, "max_tokens": 2})
    status, body = send(served, raw, "/v1/completions")
    assert status == 400, body
    assert body["error"]["param"].startswith(param)


def test_a_body_over_the_limit_is_413_whether_declared_or_streamed(served: Server) -> None:
    big = chat_body(served, user="x" * 100_000).encode()
    status, body = send(served, big)  # urllib declares the Content-Length
    assert status == 413
    assert set(body["error"]) == SHAPE

    # Chunked: no Content-Length, the limit is found while the body arrives.
    host, port = served.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    chunks = (big[i : i + 8192] for i in range(0, len(big), 8192))
    try:
        connection.request("POST", "/v1/chat/completions", chunks, AUTH, encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 413
        assert set(json.loads(response.read())["error"]) == SHAPE
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed while the rest was still being sent
    finally:
        connection.close()
    status, _ = send(served, chat_body(served))
    assert status == 200  # and the server still serves


def test_what_real_clients_send_works(served: Server) -> None:
    client = served.client()
    plain = chat(client, served.model, "tell me a story", 8)
    parts = client.chat.completions.create(
        model=served.model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "tell me "},
                    {"type": "text", "text": "a story"},
                ],
            }
        ],
        temperature=0,
        max_completion_tokens=8,
    )
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage == plain.usage
    # max_completion_tokens wins over max_tokens, as OpenAI's newer name
    status, body = send(served, chat_body(served, max_tokens=2, max_completion_tokens=3,
                                          temperature=0, ignore_eos=True))  # fmt: skip
    assert status == 200
    assert body["usage"]["completion_tokens"] <= 3
    # stop as a string and as a list
    for stop in ("\n", ["\n", "zzz"]):
        status, body = send(served, chat_body(served, stop=stop, temperature=0))
        assert status == 200, body


@pytest.mark.parametrize("temperature", [1e-30, 5e-324])
def test_a_tiny_temperature_samples_like_greedy(served: Server, temperature: float) -> None:
    client = served.client()
    greedy = chat(client, served.model, "tell me a story", 12)
    tiny = client.chat.completions.create(
        model=served.model,
        messages=[{"role": "user", "content": "tell me a story"}],
        temperature=temperature,
        max_tokens=12,
        seed=5,
    )
    assert tiny.choices[0].message.content == greedy.choices[0].message.content


def test_omitted_max_tokens_is_cut_to_the_context(served: Server) -> None:
    long_prompt = "hello " * 100  # ~100 tokens of 256: the default 256 would not fit
    status, body = send(
        served,
        json.dumps({"messages": [{"role": "user", "content": long_prompt}], "temperature": 0}),
    )
    assert status == 200, body
    usage = body["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= MAX_SEQ_LEN


class RecordingTokenizer:
    """Forwards to a tokenizer and records the thread of every encode."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.encode_threads: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        self.encode_threads.append(threading.current_thread().name)
        return self._tokenizer.apply_chat_template(*args, **kwargs)

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        self.encode_threads.append(threading.current_thread().name)
        return self._tokenizer.encode(*args, **kwargs)


def test_admission_comes_before_tokenization_which_runs_off_the_event_loop(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the one place taken, a request is 429 without its prompt being encoded (a prompt
    beyond the context is 429, not 400); prompts are encoded on the tokenizer thread, tokens
    are sampled in worker threads: neither on the event loop's thread."""
    import cake.decoding.generate

    sampled_on: list[str] = []

    class RecordingSampler(cake.decoding.generate.Sampler):
        def __call__(self, logits: Any, history: Any) -> int:
            sampled_on.append(threading.current_thread().name)
            return super().__call__(logits, history)

    monkeypatch.setattr(cake.decoding.generate, "Sampler", RecordingSampler)
    gate: list[Any] = []
    recorder: list[RecordingTokenizer] = []
    throttles: list[ThrottledStage] = []

    def hold(master: Master) -> None:
        import asyncio

        gate.append(asyncio.Event())
        throttles.append(ThrottledStage(master.pipeline.stages[0], gate=gate[0]))
        master.pipeline.stages[0] = throttles[0]
        recorder.append(RecordingTokenizer(master.tokenizer))
        master.tokenizer = recorder[0]

    with api_in_thread(tiny_llama, prepare=hold, api_key=API_KEY, max_concurrent=1) as server:
        held: list[tuple] = []
        first = threading.Thread(target=lambda: held.append(send(server, chat_body(server))))
        first.start()
        assert wait_until(lambda: throttles[0].in_flight == 1)  # encoded, held at the gate
        assert len(server.service.running) == 1
        encoded = len(recorder[0].encode_threads)
        too_long = [{"role": "user", "content": "hello " * 300}]
        status, body = send(server, chat_body(server, messages=too_long))
        assert status == 429, body
        assert body["error"]["type"] == "rate_limit_error"
        assert len(recorder[0].encode_threads) == encoded  # refused before any tokenization
        server.call_soon(gate[0].set)
        first.join(30)
        assert held and held[0][0] == 200
        assert wait_until(lambda: not server.service.running)
        status, body = send(server, chat_body(server, messages=too_long))
        assert status == 400  # with room: encoded, then refused for its length
        loop_thread = server.loop_thread_name
    threads = recorder[0].encode_threads
    assert threads and all(name.startswith("cake-tokenize") for name in threads), threads
    assert sampled_on and loop_thread not in sampled_on, (loop_thread, set(sampled_on))


def test_a_non_streaming_client_that_hangs_up_stops_its_generation(
    tiny_llama: Path, tmp_path: Path
) -> None:
    throttles: list[ThrottledStage] = []

    def slow_down(master: Master) -> None:  # 20 ms per step: 200 tokens would take 4 s
        throttles.append(ThrottledStage(master.pipeline.stages[0], delay=0.02))
        master.pipeline.stages[0] = throttles[0]

    layers = {"w1": ["model.layers.0-1"], "w2": ["model.layers.2-3"]}
    with api_in_thread(tiny_llama, tmp_path, layers, slow_down) as server:
        host, port = server.url.removeprefix("http://").split(":")
        body = json.dumps(
            {"messages": HI, "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        ).encode()
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            assert wait_until(lambda: throttles[0].forwards >= 3)
            assert all(w.session_count == 1 for w in server.workers.values())
        # the client hung up before any answer
        assert wait_until(lambda: all(w.session_count == 0 for w in server.workers.values()), 2)
        assert wait_until(lambda: not server.service.running, 2)
        steps = throttles[0].forwards
        time.sleep(0.2)  # a generation that went on would make more forwards meanwhile
        assert throttles[0].forwards == steps < 100, "the generation went on"
