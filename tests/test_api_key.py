"""One API key check for the /v1 routes and the chat page's status: the same answers, the same
401 (OpenAI's shape, WWW-Authenticate: Bearer), with no model behind the app."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.requests import Request

from cake.faces.api.errors import install_error_handlers
from cake.faces.api.routes import api_key_problem, authorize, is_authorized
from cake.faces.webchat import mount_webchat

KEY = "the-key"
MISSING = "missing API key: send it as 'Authorization: Bearer <key>' (or 'x-api-key: <key>')"


def request(
    authorization: str | None, api_key: str | None = KEY, x_api_key: str | None = None
) -> Request:
    headers = [] if authorization is None else [(b"authorization", authorization.encode())]
    if x_api_key is not None:
        headers.append((b"x-api-key", x_api_key.encode()))
    app = SimpleNamespace(state=SimpleNamespace(api_key=api_key))
    return Request({"type": "http", "headers": headers, "app": app})


@pytest.mark.parametrize(
    ("authorization", "problem"),
    [
        (f"Bearer {KEY}", None),
        (f"bearer  {KEY} ", None),  # the scheme in any case, the token stripped
        (None, MISSING),
        ("Bearer", MISSING),
        (f"Basic {KEY}", MISSING),
        ("Bearer not-the-key", "incorrect API key"),
    ],
)
def test_the_key_check(authorization: str | None, problem: str | None) -> None:
    assert api_key_problem(request(authorization)) == problem
    assert is_authorized(request(authorization)) is (problem is None)


@pytest.mark.parametrize(
    ("authorization", "x_api_key", "problem"),
    [
        (None, KEY, None),  # as Anthropic's clients send it
        (None, f" {KEY} ", None),
        (None, "not-the-key", "incorrect API key"),
        (None, "", MISSING),
        ("Bearer not-the-key", KEY, "incorrect API key"),  # a bearer token is what counts
        ("Basic whatever", KEY, None),
    ],
)
def test_the_key_as_x_api_key(
    authorization: str | None, x_api_key: str, problem: str | None
) -> None:
    assert api_key_problem(request(authorization, x_api_key=x_api_key)) == problem


def test_a_server_without_a_key_lets_everyone_in() -> None:
    assert api_key_problem(request(None, api_key=None)) is None
    authorize(request("Basic whatever", api_key=None))


class FakeService:
    model_name = "tiny"
    master = SimpleNamespace(max_seq_len=256)

    async def health(self) -> tuple[bool, dict[str, Any]]:
        return True, {"running": 0, "max_concurrent": 1, "stages": []}


def chat_app() -> FastAPI:
    app = FastAPI()
    app.state.api_key, app.state.service = KEY, FakeService()
    install_error_handlers(app)
    mount_webchat(app, api_key_required=True, authorize=authorize)
    return app


async def get(app: FastAPI, path: str, authorization: str | None) -> tuple[int, dict, Any]:
    """One GET through the ASGI app, no server: (status, headers, JSON body)."""
    headers = [(b"host", b"test")]
    if authorization is not None:
        headers.append((b"authorization", authorization.encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    named = {name.decode().lower(): value.decode() for name, value in start["headers"]}
    return start["status"], named, json.loads(body)


def test_the_chat_status_answers_401_like_the_v1_routes() -> None:
    app = chat_app()
    for authorization, message in [(None, MISSING), ("Bearer wrong", "incorrect API key")]:
        status, headers, body = asyncio.run(get(app, "/v1/cake/status", authorization))
        assert (status, headers["www-authenticate"]) == (401, "Bearer")
        assert body == {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
    status, _, body = asyncio.run(get(app, "/v1/cake/status", f"Bearer {KEY}"))
    assert status == 200 and body["model"] == "tiny" and body["context"] == 256
