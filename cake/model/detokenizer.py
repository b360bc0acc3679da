"""Token ids back to text as they stream: pieces whose concatenation is exactly the whole
decode, held back where a later token can still change them, cut before a stop string."""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)


class StopFilter:
    """Cuts streamed text before the first stop string.

    Text that could still be the start of a stop string is held back until the next piece
    decides, so a stop string is never sent, not even split across two pieces. The held text is
    shorter than the longest stop string, so each piece costs time in its own length only.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = False
        self.matched: str | None = None  # the stop string found (the first in the text)

    def push(self, piece: str) -> str:
        """The text that is now safe to send."""
        if self.hit or not self.stops:
            return "" if self.hit else piece
        self.pending += piece
        found = [(at, stop) for stop in self.stops if (at := self.pending.find(stop)) >= 0]
        if found:
            at, self.matched = min(found)
            self.hit = True
            text, self.pending = self.pending[:at], ""
            return text
        keep = self._partial_stop_len()
        text = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return text

    def flush(self) -> str:
        """At the end of the generation: what was held back was no stop string after all."""
        text, self.pending = self.pending, ""
        return "" if self.hit else text

    def _partial_stop_len(self) -> int:
        """Length of the longest end of `pending` that a stop string begins with."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(stop[:k]):
                    longest = k
                    break
        return longest


class StreamDecoder:
    """Turns token ids, one at a time, into text pieces whose concatenation is exactly
    `tokenizer.decode(all_ids, skip_special_tokens=True)`, cut before the first stop string.

    Decoding every token alone breaks multi-byte characters (split over tokens) and leading
    spaces, so each push decodes a short *window*: the last few tokens, whose text the caller
    has partly received already (`_sent_text`), and emits what is new. The window slides forward
    at a token boundary where decoding the two sides apart gives the same text as decoding them
    together, so a push costs a few tokens' decoding however long the output (the whole output
    re-decoded each time was quadratic: 2.4 s over 4,000 tokens).

    Text that a later token can still change is held back: an incomplete UTF-8 sequence (shown
    as U+FFFD), trailing spaces, and, for tokenizers that clean up spaces before punctuation
    (`" ."` -> `"."`, `" n't"` -> `"n't"`), anything after a space in the last 3 characters.
    """

    WINDOW = 8  # tokens kept behind the slide point; the window holds WINDOW..2*WINDOW tokens

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._start = 0  # the window is ids[_start:]
        self._sent_text = ""  # the start of the window's text that was emitted
        self._cleans_spaces = _cleans_up_spaces(tokenizer)
        self.stop_filter = StopFilter(stops)

    @property
    def stopped(self) -> bool:
        """A stop string was found: nothing more is emitted, the caller should stop."""
        return self.stop_filter.hit

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:stop], skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """The text that this token makes final (often "", sometimes several tokens' worth)."""
        self.ids.append(token_id)
        text = self._decode(self._start)
        stable = self._stable(text)
        piece = ""
        if len(stable) > len(self._sent_text) and stable.startswith(self._sent_text):
            piece = stable[len(self._sent_text) :]
            self._sent_text = stable
        if len(self.ids) - self._start >= 2 * self.WINDOW:
            self._slide(text)
        return self.stop_filter.push(piece)

    def finish(self) -> str:
        """The rest, at the end of the generation (what was held back is final now)."""
        text = self._decode(self._start)
        if not text.startswith(self._sent_text):
            log.warning("detokenisation changed already printed text; printing the remainder")
        piece = text[len(self._sent_text) :] if len(text) > len(self._sent_text) else ""
        self._sent_text = text
        return self.stop_filter.push(piece) + self.stop_filter.flush()

    def _stable(self, text: str) -> str:
        stable = text.rstrip("\ufffd").rstrip(" ")
        if self._cleans_spaces:
            space = stable.rfind(" ", max(len(stable) - 3, 0))
            if space >= 0:
                stable = stable[:space]
        return stable

    def _slide(self, text: str) -> None:
        """Move the window's start to a boundary whose two sides decode apart as together.

        Byte-level BPE (Llama 3, SmolLM2) fails the check only inside a multi-byte character,
        so the first boundary tried almost always holds; SentencePiece drops a leading space at
        the start of a decode, so there a boundary before a word-continuing token is found.
        Exact for any valid UTF-8 output. With byte-fallback tokenizers (Llama 2, Mistral), a
        run of byte tokens that is no valid UTF-8 becomes U+FFFD as a whole, bytes already sent
        included: no stream can be exact there, and `finish` warns.
        """
        for boundary in range(len(self.ids) - self.WINDOW, len(self.ids) - 2 * self.WINDOW, -1):
            head = self._decode(self._start, boundary)
            if len(head) > len(self._sent_text) or not text.startswith(head):
                continue
            if self._cleans_spaces and " " in head[-3:]:
                continue  # a clean-up pattern could still join the two sides
            tail = self._decode(boundary)
            if head.endswith("\ufffd") or tail.startswith("\ufffd"):
                continue  # maybe a character split between the two (shown as U+FFFD either way)
            if head + tail == text:
                self._start = boundary
                self._sent_text = self._sent_text[len(head) :]
                return


_CLEANS_UP_SPACES: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _cleans_up_spaces(tokenizer: Any) -> bool:
    """Whether `decode` removes spaces before punctuation (transformers' clean-up), which
    changes text across token boundaries: seen by decoding a probe that has such a space
    (once per tokenizer)."""
    try:
        return _CLEANS_UP_SPACES[tokenizer]
    except (KeyError, TypeError):
        pass
    probe = "a . b"
    try:
        ids = tokenizer.encode(probe, add_special_tokens=False)
        cleans = tokenizer.decode(ids, skip_special_tokens=True) != probe
    except Exception:  # a tokenizer that cannot say: hold back as if it did
        return True
    with contextlib.suppress(TypeError):  # not weakly referenceable: probe each time
        _CLEANS_UP_SPACES[tokenizer] = cleans
    return cleans
