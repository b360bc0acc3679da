"""Where the master's own tensor work runs: inline, or on a thread.

A single CLI generation runs it inline on the event loop: nothing else waits, and a thread hop
per step would cost two futex wakes. The HTTP API runs it on a thread, so the event loop keeps
serving the other requests' streams, pings and workers' replies meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


class MasterCompute:
    def __init__(self, offload: bool = False) -> None:
        self.offload = offload

    async def __call__(self, fn: Callable[..., T], *args: object) -> T:
        def run() -> T:
            with torch.inference_mode():
                return fn(*args)

        return await asyncio.to_thread(run) if self.offload else run()
