"""Retry with backoff until a deadline: the one loop for "try again, a worker may come back".

Used where the master waits for a worker: reconnecting a lost one (worker_link), resuming a
push after a broken connection and asking a busy empty worker to take an assignment again
(cake/cluster/setup.py). The first attempt always runs, even past the deadline (a health check
gets its one try); after a failure the pause doubles up to `max_delay` but never runs past the
deadline, and at the deadline the last failure is raised (or what `give_up` makes of it).

The clock and the sleep are parameters so tests drive it with a fake clock, not real sleeps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def retry(
    attempt: Callable[[float], Awaitable[T]],
    *,
    retry_on: type[Exception] | tuple[type[Exception], ...],
    deadline: float,
    first_delay: float,
    max_delay: float,
    retry_if: Callable[[Exception], bool] = lambda exc: True,
    on_retry: Callable[[Exception, float], object] | None = None,
    pause_for: Callable[[Exception, float], float] | None = None,
    give_up: Callable[[Exception], Exception] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> T:
    """What `attempt(seconds left until deadline)` returns, once it succeeds.

    A `retry_on` failure for which `retry_if` holds is tried again after a pause: `first_delay`
    seconds, doubled after each failure up to `max_delay`, cut short at `deadline` (a
    `clock()` time); `pause_for(failure, pause)` may choose another pause for a failure (a
    worker that says it is loading is asked again at a steady pace). Any other exception
    propagates at once. `on_retry(failure, pause)` is
    called before each pause (to log it). At the deadline the last failure is raised, or
    `give_up(failure)` when given (an error that says how long we waited and for what).
    """
    if first_delay <= 0 or max_delay < first_delay:
        raise ValueError(f"need 0 < first_delay <= max_delay, got {first_delay}, {max_delay}")
    delay = first_delay
    while True:
        try:
            return await attempt(deadline - clock())
        except retry_on as failure:
            if not retry_if(failure):
                raise
            left = deadline - clock()
            if left <= 0:
                if give_up is None:
                    raise
                raise give_up(failure) from None
            pause = min(delay, left)
            if pause_for is not None:
                pause = min(pause_for(failure, pause), left)
            if on_retry is not None:
                on_retry(failure, pause)
            await sleep(pause)
            delay = min(delay * 2, max_delay)
