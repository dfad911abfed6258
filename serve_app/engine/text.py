"""Streaming text helpers: UTF-8-safe incremental decoding and stop strings that may straddle tokens.

Both keep only a bounded tail between pushes (a partial character; a partial stop string), so the work per token
does not grow with the output. No llama.cpp here.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class Utf8Stream:
    """Turns token pieces (bytes) into text without ever emitting half a character.

    A byte-fallback tokenizer can split one character over several tokens; decoding each piece alone would emit
    U+FFFD replacement characters mid-stream.
    """

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, piece: bytes) -> str:
        return self._dec.decode(piece, final=False)

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class StopMatcher:
    """Finds the first stop string in generated text, holding back text that could be the start of one.

    ``push`` returns ``(text_safe_to_emit, stopped)``. Once stopped, the text up to (not including) the stop string
    has been emitted and nothing more will be. Each push searches only the new text plus the held tail, which is
    shorter than the longest stop string, so the whole output is scanned in linear time (``scanned`` counts it).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.max_hold = max((len(s) for s in self._stops), default=0) - 1
        self.scanned = 0  # characters searched so far, over all pushes

    def push(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        buf = self._held + text
        self.scanned += len(buf)
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buf[:cut], True
        hold = self._partial_suffix(buf)
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of some stop string."""
        for n in range(min(self.max_hold, len(buf)), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0
