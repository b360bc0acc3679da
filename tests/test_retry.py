"""The retry helper on a fake clock: pauses double up to a cap, never run past the deadline,
and the last failure (or give_up's error) comes out at the deadline."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import pytest

from cake.wire.retry import retry


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pauses: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.pauses.append(round(seconds, 6))
        self.now += seconds


def failing(times: int, error: Exception, result: str = "done") -> Callable:
    """An attempt that raises `error` `times` times, then returns `result`; it records the
    seconds left it was given."""
    calls: list[float] = []

    async def attempt(left: float) -> str:
        calls.append(round(left, 6))
        if len(calls) <= times:
            raise error
        return result

    attempt.calls = calls  # type: ignore[attr-defined]
    return attempt


def run(attempt: Callable, fake: FakeTime, **options: object) -> object:
    settings: dict = {
        "retry_on": ConnectionError,
        "deadline": 10.0,
        "first_delay": 0.1,
        "max_delay": 2.0,
        "clock": fake.clock,
        "sleep": fake.sleep,
    }
    settings.update(options)
    return asyncio.run(retry(attempt, **settings))


def test_pauses_double_up_to_the_cap_and_the_result_comes_back() -> None:
    fake = FakeTime()
    attempt = failing(7, ConnectionError("refused"))
    assert run(attempt, fake) == "done"
    assert fake.pauses == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert attempt.calls[0] == 10.0 and attempt.calls[1] == 9.9  # the time left, each try


def test_the_last_pause_stops_at_the_deadline_then_the_failure_is_raised() -> None:
    fake = FakeTime()
    error = ConnectionError("still down")
    with pytest.raises(ConnectionError, match="still down"):
        run(failing(100, error), fake, deadline=2.0, first_delay=0.25, max_delay=4.0)
    assert fake.pauses == [0.25, 0.5, 1.0, 0.25]  # 2.0 would pass the deadline
    assert fake.now == 2.0


def test_give_up_turns_the_last_failure_into_its_error() -> None:
    fake = FakeTime()

    def give_up(failure: Exception) -> Exception:
        return TimeoutError(f"gave up waiting: {failure}")

    with pytest.raises(TimeoutError, match="gave up waiting: down"):
        run(failing(100, ConnectionError("down")), fake, deadline=0.5, give_up=give_up)


def test_the_first_attempt_runs_even_past_the_deadline() -> None:
    fake = FakeTime()
    fake.now = 5.0
    assert run(failing(0, ConnectionError()), fake, deadline=1.0) == "done"
    with pytest.raises(ConnectionError):
        run(failing(1, ConnectionError()), fake, deadline=1.0)
    assert fake.pauses == []  # one try, no pause


def test_other_failures_propagate_at_once() -> None:
    fake = FakeTime()
    with pytest.raises(ValueError):
        run(failing(1, ValueError("a bug")), fake)
    assert fake.pauses == []


def test_retry_if_stops_a_failure_it_does_not_want_retried() -> None:
    fake = FakeTime()
    closed = ConnectionError("closed")
    with pytest.raises(ConnectionError, match="closed"):
        run(failing(5, closed), fake, retry_if=lambda failure: failure is not closed)
    assert fake.pauses == []


def test_on_retry_hears_each_failure_and_its_pause() -> None:
    fake = FakeTime()
    heard: list[tuple[str, float]] = []
    run(
        failing(2, ConnectionError("flaky")),
        fake,
        on_retry=lambda failure, pause: heard.append((str(failure), round(pause, 6))),
    )
    assert heard == [("flaky", 0.1), ("flaky", 0.2)]


def test_a_constant_pause_when_the_cap_is_the_first_delay() -> None:
    fake = FakeTime()
    run(failing(3, ConnectionError()), fake, first_delay=0.1, max_delay=0.1)
    assert fake.pauses == [0.1, 0.1, 0.1]


def test_bad_delays_are_refused() -> None:
    with pytest.raises(ValueError, match="first_delay"):
        run(failing(0, ConnectionError()), FakeTime(), first_delay=1.0, max_delay=0.5)


def test_pause_for_sets_a_failures_own_pace_without_passing_the_deadline() -> None:
    """A worker that says it is loading is asked again at a steady pace; the pause still stops
    at the deadline, and the others' backoff goes on doubling."""
    fake = FakeTime()
    errors = itertools.cycle([TimeoutError("loading"), ConnectionError("refused")])

    async def attempt(left: float) -> str:
        raise next(errors)

    with pytest.raises(TimeoutError):  # the 7th attempt's, at the deadline
        run(
            attempt,
            fake,
            retry_on=(TimeoutError, ConnectionError),
            deadline=2.7,
            pause_for=lambda failure, pause: 0.5 if isinstance(failure, TimeoutError) else pause,
        )
    assert fake.pauses == [0.5, 0.2, 0.5, 0.8, 0.5, 0.2]  # the last cut at the deadline
