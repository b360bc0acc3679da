"""The chat page that `cake-cli --api HOST:PORT` serves at `/`, and the status it shows.

- `GET /` is the page (cake/faces/static/chat.html); `GET /static/...` its script, style and
  markdown renderer. No build step and no CDN: the files ship in the package and the page works
  with no internet. The page talks to our own `POST /v1/chat/completions` (streamed).
- `GET /v1/cake/status` is what the page's status strip shows: the model, its context, each
  stage with its blocks, worker and address and whether it is reachable now, the requests
  running. It names the workers, so it asks for the API key when the server has one (like the
  /v1 routes; the page itself and its static files are public, they hold nothing).

`mount_webchat(app, api_key_required, authorize)` adds these routes to the API's FastAPI app,
the status behind the API's own key check (`authorize`, cake/faces/api/routes.py); the page
reads the model's service from `app.state.service` (its `health()` is the source of the stage
list).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_PACKAGE = ("cake.faces", "static")
PAGE = "chat.html"
# The page learns whether to ask for a key from this tag, without a request that could fail.
KEY_TAG = '<meta name="cake-api-key-required" content="false">'


def static_file(name: str) -> str:
    """The text of one file shipped in cake/faces/static (the page, its script and style)."""
    return resources.files(STATIC_PACKAGE[0]).joinpath(STATIC_PACKAGE[1], name).read_text("utf-8")


def chat_page(api_key_required: bool) -> str:
    page = static_file(PAGE)
    if KEY_TAG not in page:
        raise RuntimeError(f"{PAGE} lost its {KEY_TAG!r} tag: the page could not ask for a key")
    return page.replace(KEY_TAG, KEY_TAG.replace("false", "true")) if api_key_required else page


async def status(service: Any) -> dict[str, Any]:
    """Model, context and stages, as the page's status strip shows them."""
    ok, health = await service.health()
    return {
        "model": service.model_name,
        "context": service.master.max_seq_len,
        "reachable": ok,
        "running": health["running"],
        "max_concurrent": health["max_concurrent"],
        "stages": health["stages"],
    }


def mount_webchat(
    app: FastAPI, api_key_required: bool, authorize: Callable[[Request], None]
) -> None:
    """Serve the chat page at `/`, its files at `/static`, its status at `/v1/cake/status`.

    The page and its files are public (they hold nothing); the status names the workers, so
    `authorize` (a dependency that raises a 401 unless the request carries the API key) guards
    it, the same check as the /v1 routes'."""
    page = chat_page(api_key_required)  # read once: a missing file fails now

    @app.get("/", include_in_schema=False)
    async def chat() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/v1/cake/status", dependencies=[Depends(authorize)])
    async def cake_status() -> Any:
        return await status(app.state.service)

    app.mount("/static", StaticFiles(packages=[STATIC_PACKAGE]), name="static")
