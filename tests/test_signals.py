"""A serving process stops on SIGTERM or SIGINT, and a second signal does not interrupt it."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from cake.host.signals import stop_signal


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_resolves_the_future_with_which(sig: signal.Signals) -> None:
    async def main() -> signal.Signals:
        stopped = stop_signal()  # installed before the signal, as before a "serving" line
        os.kill(os.getpid(), sig)
        received = await asyncio.wait_for(stopped, 10)
        os.kill(os.getpid(), sig)  # a second one, during the shutdown: handled, ignored
        await asyncio.wait_for(asyncio.shield(stopped), 10)
        return received

    assert asyncio.run(main()) == sig
