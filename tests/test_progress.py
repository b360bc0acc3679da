"""cake/host/progress.py: bars on stderr when it is a terminal, nothing at all otherwise."""

from __future__ import annotations

import io

import pytest

from cake.host.progress import enabled, progress, progress_bar


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_silent_when_not_a_terminal() -> None:
    stream = io.StringIO()
    assert list(progress(range(5), "loading", stream=stream)) == [0, 1, 2, 3, 4]
    with progress_bar(10, "copying", unit="B", stream=stream) as bar:
        bar.update(10)
    assert stream.getvalue() == ""
    assert not enabled(stream)


def test_draws_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAKE_PROGRESS", raising=False)
    stream = FakeTerminal()
    assert list(progress(range(3), "loading weights", unit="part", stream=stream)) == [0, 1, 2]
    drawn = stream.getvalue()
    assert "loading weights:" in drawn and "/3 [" in drawn
    assert drawn.endswith("\r")  # and erased when done: the log line after it says the rest
    stream = FakeTerminal()
    with progress_bar(4096, "splitting", unit="B", stream=stream) as bar:
        bar.update(4096)
    assert "splitting:" in stream.getvalue() and "B/s" in stream.getvalue()


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAKE_PROGRESS", "0")
    stream = FakeTerminal()
    assert list(progress(range(3), "loading", stream=stream)) == [0, 1, 2]
    assert stream.getvalue() == ""
