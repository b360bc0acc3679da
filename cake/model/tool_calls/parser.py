"""The model's output, as it streams, split into text and tool calls.

Text streams on as it comes, except what could be the start of a call (`<tool_call>` arriving
in pieces, or the first `{` of a format whose calls open the answer): that is held until the
call is complete. A complete call is checked (valid JSON, a tool that was offered) and handed
on whole: a client never receives a call it would have to take back. A call that fails the
check, or that the output ends inside of, goes on as the text it was. With `parallel` off,
calls after the first are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

from cake.model.tool_calls.base import ToolCallFormat
from cake.model.tool_calls.types import Tool, ToolCall

Piece = str | ToolCall  # text to send, or a call


class ToolCallParser:
    """Feed it the output's text pieces (`push`), then `finish`; each returns the pieces that
    are final now, text merged. The pieces of all calls, in order, are the same however the
    output was cut into pushes."""

    def __init__(self, fmt: ToolCallFormat, tools: Sequence[Tool], parallel: bool = True) -> None:
        self.format = fmt
        self.names = {tool.name for tool in tools}
        self.parallel = parallel
        self.calls: list[ToolCall] = []
        self._pending = ""  # text not yet handed on
        self._in_call = False  # _pending starts with a call's region
        self._at_output_start = True
        self._never = False  # no call can start any more
        self._after_call = False  # a call was the last thing handed on

    def push(self, text: str) -> list[Piece]:
        self._pending += text
        pieces: list[Piece] = []
        while self._pending:
            if self._in_call:
                end = self.format.find_end(self._pending)
                if end is None:
                    break
                region, self._pending = self._pending[:end], self._pending[end:]
                self._in_call = False
                pieces += self._checked(region)
                continue
            if not self._never:
                found = self.format.find_start(self._pending, self._at_output_start)
                self._never = found.never
            if self._never:
                pieces.append(self._text(self._pending))
                self._pending = ""
            elif found.at is None:
                cut = len(self._pending) - found.hold
                if cut > 0:
                    pieces.append(self._text(self._pending[:cut]))
                    self._pending = self._pending[cut:]
                break
            else:
                if found.at > 0:
                    pieces.append(self._text(self._pending[: found.at]))
                    self._pending = self._pending[found.at :]
                self._in_call = True
        return _merged(pieces)

    def finish(self) -> list[Piece]:
        """The end of the output: a call region still open is parsed as it is (an answer may
        end without its closing marker); held text is text."""
        region, self._pending = self._pending, ""
        if self._in_call:
            self._in_call = False
            return _merged(self._checked(region))
        return _merged([self._text(region)]) if region else []

    def _text(self, text: str) -> str:
        if self._after_call:  # the whitespace between calls, or after the last, is no text
            text = text.lstrip()
            self._after_call = not text
        if text.strip():
            self._at_output_start = False
        return text

    def _checked(self, region: str) -> list[Piece]:
        calls = self.format.parse(region)
        if calls is None or any(call.name not in self.names for call in calls):
            return [self._text(region)]
        self._at_output_start = False
        self._after_call = True
        if not self.parallel:
            calls = [] if self.calls else calls[:1]
        self.calls += calls
        return list(calls)


def _merged(pieces: list[Piece]) -> list[Piece]:
    merged: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, str):
            if not piece:
                continue
            if merged and isinstance(merged[-1], str):
                merged[-1] += piece
                continue
        merged.append(piece)
    return merged
