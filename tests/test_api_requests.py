"""What the API does with what clients send: every malformed, out-of-range or hostile request
is a 4xx with OpenAI's error body (never a 500) and the server goes on serving; the shapes real
clients send (content parts, max_completion_tokens, stop as string or list) work."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from api_server import API_KEY, MAX_SEQ_LEN, Server, ThrottledStage, api_in_thread, chat, post
from helpers import wait_until

from cake.engine.session_store import kv_bytes_per_position
from cake.faces.api.schemas import ApiDefaults
from cake.master import Master
from cake.model.config import LlamaConfig
from cake.model.tokenizer import encode_chat

SHAPE = {"message", "type", "param", "code"}
AUTH = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
HI = [{"role": "user", "content": "hi"}]
LIMIT = 64 * 1024  # the body limit of `served`


@pytest.fixture(scope="module")
def served(tiny_llama: Path) -> Iterator[Server]:
    """The tiny model on the master alone, behind an API key, with a 64 KiB body limit."""
    with api_in_thread(tiny_llama, api_key=API_KEY, max_body_bytes=LIMIT) as server:
        yield server


@pytest.fixture(scope="module")
def ignoring_eos(tiny_llama: Path) -> Iterator[Server]:
    """The tiny model started as `cake-cli --api --ignore-eos`: an answer runs to its limit,
    so its length is known exactly."""
    with api_in_thread(
        tiny_llama, api_key=API_KEY, defaults=ApiDefaults(ignore_eos=True)
    ) as server:
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
    ({"messages": [{"role": "tool", "content": "hi"}]}, "messages.0.tool_call_id"),
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
    ({"logprobs": 5}, "logprobs"),  # chat's is a boolean; top_logprobs says how many
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
        "response_format",
    ),
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
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

    # Chunked: no Content-Length, the limit is found while the body arrives. The body stops
    # one byte past the limit (no last chunk): the server has read all that was sent when it
    # answers, so it closes cleanly and the 413 is there to read.
    host, port = served.url.removeprefix("http://").split(":")
    head = "".join(f"{name}: {value}\r\n" for name, value in AUTH.items())
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            + head.encode()
            + b"\r\n"
        )
        for _ in range(LIMIT // 8192):  # exactly the limit: still accepted
            sock.sendall(b"2000\r\n" + b"x" * 8192 + b"\r\n")
        sock.sendall(b"1\r\nx\r\n")  # one byte more
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 413
        error = json.loads(response.read())["error"]
    assert set(error) == SHAPE
    assert error["code"] == "request_too_large"
    assert str(LIMIT) in error["message"]
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
    # (the second request found the first one's prompt in the prefix cache)
    assert parts.usage.model_dump(exclude={"prompt_tokens_details"}) == plain.usage.model_dump(
        exclude={"prompt_tokens_details"}
    )
    assert parts.usage.prompt_tokens_details.cached_tokens == plain.usage.prompt_tokens - 1


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"max_tokens": 3}, 3),
        ({"max_completion_tokens": 3}, 3),
        ({"max_tokens": 2, "max_completion_tokens": 3}, 3),  # the newer name wins ...
        ({"max_tokens": 3, "max_completion_tokens": 2}, 2),  # ... larger or smaller
    ],
)
def test_max_completion_tokens_wins_over_max_tokens(
    ignoring_eos: Server, fields: dict, expected: int
) -> None:
    body = json.dumps({"messages": HI, "temperature": 0, **fields})
    status, reply = send(ignoring_eos, body)
    assert status == 200, reply
    assert reply["usage"]["completion_tokens"] == expected
    assert reply["choices"][0]["finish_reason"] == "length"


def test_stop_as_a_string_or_a_list_cuts_the_text_before_it(ignoring_eos: Server) -> None:
    """The text up to the stop string's first occurrence in the greedy text (from
    Master.generate's tokens, no HTTP), and finish_reason "stop"."""
    n, tokenizer = 24, ignoring_eos.master.tokenizer
    messages = [{"role": "user", "content": "tell me a story"}]
    prompt_ids = encode_chat(tokenizer, messages)
    tokens = ignoring_eos.greedy(prompt_ids, n, ignore_eos=True)
    full = tokenizer.decode(tokens, skip_special_tokens=True)
    start = len(full) // 2  # a stop string from the middle, ending in a visible character
    while not full[start + 1].strip():
        start += 1
    stop = full[start : start + 2]
    expected = full[: full.index(stop)]
    assert 0 < len(expected) < len(full) - len(stop)
    for stops in (stop, ["never in the text", stop]):
        body = json.dumps({"messages": messages, "temperature": 0, "max_tokens": n, "stop": stops})
        status, reply = send(ignoring_eos, body)
        assert status == 200, reply
        assert reply["choices"][0]["message"]["content"] == expected
        assert reply["choices"][0]["finish_reason"] == "stop"


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


def test_omitted_max_tokens_is_cut_to_the_context(ignoring_eos: Server) -> None:
    """Without max_tokens the server's default (256) is cut to what the context has left: the
    answer fills the context exactly, and says "length"."""
    messages = [{"role": "user", "content": "hello " * 200}]
    prompt_tokens = len(encode_chat(ignoring_eos.master.tokenizer, messages))
    assert 0 < MAX_SEQ_LEN - prompt_tokens < ApiDefaults().max_tokens
    status, body = send(ignoring_eos, json.dumps({"messages": messages, "temperature": 0}))
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert body["usage"]["completion_tokens"] == MAX_SEQ_LEN - prompt_tokens
    assert body["choices"][0]["finish_reason"] == "length"


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
        gate.append(asyncio.Event())
        throttles.append(ThrottledStage(master.pipeline.stages[0], gate=gate[0]))
        master.pipeline.stages[0] = throttles[0]
        recorder.append(RecordingTokenizer(master.tokenizer))
        master.tokenizer = recorder[0]

    with api_in_thread(tiny_llama, prepare=hold, api_key=API_KEY, max_concurrent=1) as server:
        held: list[tuple] = []
        first = threading.Thread(target=lambda: held.append(send(server, chat_body(server))))
        first.start()
        wait_until(lambda: throttles[0].in_flight == 1)  # encoded, held at the gate
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
        wait_until(lambda: not server.service.running)
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
            wait_until(lambda: throttles[0].forwards >= 3)
            assert all(w.session_count == 1 for w in server.workers.values())
        # the client hung up before any answer
        wait_until(lambda: all(w.session_count == 0 for w in server.workers.values()), 2)
        wait_until(lambda: not server.service.running, 2)
        # No request is running: the generation's task has ended, its forwards are all done.
        assert throttles[0].forwards < 100, "the generation went on"


def test_the_masters_own_kv_budget_refuses_a_long_prompt_with_503(tiny_llama: Path) -> None:
    """The master runs every block, with a KV budget of one session at the full context. A
    first request holds 3 of its 4 pages (its decode step waits at a gate); a second long
    prompt needs 3 more: 503 kv_memory_full, naming --kv-memory. Once the first is done, the
    same request is served."""
    config = LlamaConfig.from_folder(tiny_llama)
    per_position = kv_bytes_per_position(
        config.n_layers, config.n_kv_heads, config.head_dim, torch.float32
    )
    one_session = MAX_SEQ_LEN * per_position
    gate: list[asyncio.Event] = []
    throttles: list[ThrottledStage] = []

    def decoding(rows: Any) -> bool:
        return any(row.start_pos > 0 for row in rows)

    def hold_decode_steps(master: Master) -> None:
        gate.append(asyncio.Event())
        throttles.append(ThrottledStage(master.pipeline.stages[0], gate=gate[0], hold=decoding))
        master.pipeline.stages[0] = throttles[0]

    # Without batching each request steps on its own: a held decode step holds no other.
    options = {"kv_memory": str(one_session), "batching": False}
    long_prompt = [{"role": "user", "content": "hello " * 150}]  # 161 tokens: 3 pages of 64
    with api_in_thread(
        tiny_llama, prepare=hold_decode_steps, api_key=API_KEY, master_options=options
    ) as server:
        request = json.dumps({"messages": long_prompt, "max_tokens": 4, "temperature": 0})
        first: list[tuple] = []
        holder = threading.Thread(target=lambda: first.append(send(server, request)))
        holder.start()
        try:
            server.until(lambda: throttles[0].held == 1)  # prefilled, its decode step held
            assert server.master_sessions() == 1

            status, refused = send(server, request)
            assert status == 503, refused
            assert set(refused["error"]) == SHAPE
            assert refused["error"]["code"] == "kv_memory_full"
            assert refused["error"]["type"] == "server_error"
            assert "--kv-memory" in refused["error"]["message"]
        finally:
            server.call_soon(gate[0].set)
            holder.join(30)
        assert first and first[0][0] == 200, first
        server.until(lambda: server.master_sessions() == 0)
        status, served = send(server, request)
        assert status == 200, served
        assert served["usage"]["completion_tokens"] >= 1
