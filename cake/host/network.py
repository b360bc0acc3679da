"""This machine on the network: whether a host is this one (loopback, its names, an address it
can bind), and listening sockets for the servers (worker, HTTP API), opened before any slow
start-up so that a taken port is found in milliseconds and said in one line that names the
option."""

from __future__ import annotations

import ipaddress
import socket
from functools import lru_cache


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@lru_cache(maxsize=64)
def is_this_host(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine.

    Loopback, this machine's host name, or an address that a socket can bind here (the kernel
    only lets a process bind addresses of its own interfaces). A name that does not resolve is
    not this machine (connecting to it fails later, with its own message).
    """
    if is_loopback(host) or host in (socket.gethostname(), socket.getfqdn()):
        return True
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        return False
    for family, _, _, _, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if address.is_loopback or address.is_unspecified:
            return True
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.bind((sockaddr[0], 0))
            return True
        except OSError:
            continue
    return False


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
