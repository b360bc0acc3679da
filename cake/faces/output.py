"""Generated text on stdout, and what happens when stdout stops taking it.

A reader that closes the pipe early (`cake-cli … | head -1`) ends the run quietly: the
generation stops, its sessions close, and nothing more is written anywhere. Any other failed
write (a full disk behind `> file`) is an OutputError, which the CLI reports in one line.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

# What a process killed by SIGPIPE reports (128 + 13), as `yes | head -1` does under pipefail.
READER_GONE_EXIT = 141


class ReaderGone(Exception):
    """The reader of stdout closed it."""


class OutputError(OSError):
    """stdout cannot be written (not a closed pipe: a full disk, an I/O error)."""


class TextOutput:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.gone = False

    def write(self, text: str) -> None:
        """Write and flush `text` (the reader sees each piece as it is generated)."""
        if self.gone or not text:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            self.gone = True
            raise ReaderGone from None
        except OSError as exc:
            raise OutputError(
                f"cannot write the generated text to stdout ({exc.strerror or exc})"
            ) from None


def silence_stdout() -> None:
    """After the reader is gone: point stdout at /dev/null, so that the interpreter's last
    flush at exit finds nothing to complain about."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
