"""`cake-cli --api HOST:PORT`: the listening socket, uvicorn, and the master's lifetime."""

from __future__ import annotations

import contextlib
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from cake.faces.api.routes import create_app
from cake.faces.api.schemas import ApiDefaults
from cake.host.network import listen_socket
from cake.master import Master, MasterSettings
from cake.model.hub import hub_name
from cake.topology import parse_address

log = logging.getLogger("cake.faces.api")

GRACEFUL_SHUTDOWN_S = 5.0  # then uvicorn cancels the streams still open


def model_id(model: str | Path) -> str:
    """The name clients use: the model folder's name (a .gguf file's name without suffix), or
    a hub name's ORG/NAME[:QUANT]."""
    name = hub_name(model)
    if name is not None:
        return name.model_id
    path = Path(model).resolve()
    return path.stem if path.suffix.lower() == ".gguf" else path.name


def api_address(text: str) -> tuple[str, int]:
    """`--api HOST:PORT` as the topology parses addresses, and port 0 (any free port) too."""
    head, sep, port = text.rpartition(":")
    if sep and port == "0":
        return parse_address(f"{head}:1", "--api")[0], 0
    return parse_address(text, "--api")


def listen(host: str, port: int) -> socket.socket:
    """The API's listening socket (port 0: any free port), opened before the master loads, so
    the real address is known before serving and a taken port fails in a moment."""
    return listen_socket(host, port, "--api")


def server_for(app: FastAPI) -> uvicorn.Server:
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    return uvicorn.Server(config)


@dataclass(frozen=True)
class ApiSettings:
    """`cake-cli --api`: where to listen and what requests get."""

    address: str  # --api HOST:PORT (port 0: any free port)
    model_name: str  # the id clients name the model by
    api_key: str | None = None
    max_concurrent: int = 8
    defaults: ApiDefaults = field(default_factory=ApiDefaults)


async def serve_api(master_settings: MasterSettings, api: ApiSettings) -> None:
    """Open the master (serving many sessions: see MasterSettings.serving), serve the API
    until SIGINT or SIGTERM."""
    host, port = api_address(api.address)
    sock = listen(host, port)
    try:
        master = await Master.open(master_settings)
    except BaseException:
        sock.close()
        raise
    app = create_app(
        master,
        model_name=api.model_name,
        api_key=api.api_key,
        max_concurrent=api.max_concurrent,
        defaults=api.defaults,
    )
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    log.info("API on http://%s:%d (model %r)", shown, bound_port, app.state.service.model_name)
    try:
        await server_for(app).serve(sockets=[sock])
    finally:
        await app.state.service.close()
        await master.close()
        with contextlib.suppress(OSError):
            sock.close()
