"""How a serving process learns to stop: SIGINT (Ctrl-C) or SIGTERM (kill, systemd, docker).

A worker and an empty worker serve until one arrives, then close their listener and every
connection in order. The handlers are installed before the process says it serves (its
"serving" line, its --ready-file): a supervisor that signals right after reading that line
gets an orderly stop, not the default handler's sudden death. They stay installed until the
event loop closes, so a second Ctrl-C during the shutdown does not cut it short.
"""

from __future__ import annotations

import asyncio
import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stop_signal() -> asyncio.Future[signal.Signals]:
    """A future that the first SIGINT or SIGTERM resolves, with which one; the handlers are
    installed now. Call it from the main thread's running loop."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[signal.Signals] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not received.done():
            received.set_result(sig)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    return received
