"""Progress bars for long operations, on stderr and only when stderr is a terminal.

Two calls cover every use: `progress(items, "loading blocks", unit="block")` wraps an iterable,
and `with progress_bar(total_bytes, "writing bundles", unit="B") as bar: bar.update(n)` counts
by hand. When stderr is not a terminal (a pipe, a log file, a test) both do nothing at all, so
scripts that read stderr see only the log lines. stdout is never touched: it carries the text.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from typing import IO, Protocol, TypeVar

T = TypeVar("T")

# Set to 0 to turn progress off even on a terminal (e.g. when recording a session).
ENV_SWITCH = "CAKE_PROGRESS"


class Bar(Protocol):
    def update(self, n: int = 1) -> object: ...


class _Silent:
    def update(self, n: int = 1) -> None:
        return None


def enabled(stream: IO[str] | None = None) -> bool:
    """Whether bars are drawn: stderr (or `stream`) is a terminal and CAKE_PROGRESS is not 0."""
    stream = stream if stream is not None else sys.stderr
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _tqdm_kwargs(description: str, unit: str, stream: IO[str]) -> dict[str, object]:
    scale = unit == "B"  # bytes: 1.2 GB/s rather than 1234567890 B/s
    return {
        "desc": description,
        "unit": unit,
        "unit_scale": scale,
        "unit_divisor": 1024 if scale else 1000,
        "file": stream,
        "leave": False,  # the bar goes when done; the log line that follows says what happened
        "dynamic_ncols": True,
        "mininterval": 0.2,
    }


def progress(
    items: Iterable[T],
    description: str,
    *,
    total: int | None = None,
    unit: str = "it",
    stream: IO[str] | None = None,
) -> Iterator[T]:
    """`items`, drawing a bar on stderr while they are consumed (nothing when not a terminal)."""
    stream = stream if stream is not None else sys.stderr
    if not enabled(stream):
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, total=total, **_tqdm_kwargs(description, unit, stream))


@contextlib.contextmanager
def progress_bar(
    total: int | None, description: str, *, unit: str = "it", stream: IO[str] | None = None
) -> Iterator[Bar]:
    """A bar to `update(n)` by hand (e.g. bytes copied); a silent one when not a terminal."""
    stream = stream if stream is not None else sys.stderr
    if not enabled(stream):
        yield _Silent()
        return
    from tqdm import tqdm

    with tqdm(total=total, **_tqdm_kwargs(description, unit, stream)) as bar:
        yield bar
