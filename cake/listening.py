"""Listening sockets for the servers (worker, HTTP API), opened before any slow start-up.

A port that is taken is found in milliseconds, before minutes of weight loading, and said in
one line that names the option; port 0 means any free port.
"""

from __future__ import annotations

import socket


def listen_socket(host: str, port: int, option: str) -> socket.socket:
    """A socket listening on host:port (port 0: any free one), or ValueError naming `option`."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ValueError(f"{option} {host}:{port}: cannot resolve the host ({exc})") from None
    try:
        # As asyncio and uvicorn do: a port in TIME_WAIT after a restart is free, one that a
        # live process listens on is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ValueError(
            f"{option} {host}:{port}: cannot listen there ({exc.strerror or exc}); "
            "pick another port or stop what uses it"
        ) from None
    return sock


def check_can_listen(host: str, port: int, option: str) -> None:
    """Fail now if host:port cannot be listened on (taken, not ours, unresolvable)."""
    listen_socket(host, port, option).close()
