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


class _Stop:
    """One stop string with its KMP failure table: ``state`` is the length of the longest suffix of the text seen
    so far that is a prefix of the stop string, updated in O(1) amortised per character."""

    __slots__ = ("fail", "pat", "state")

    def __init__(self, pat: str) -> None:
        fail = [0] * len(pat)
        k = 0
        for i in range(1, len(pat)):
            while k and pat[i] != pat[k]:
                k = fail[k - 1]
            if pat[i] == pat[k]:
                k += 1
            fail[i] = k
        self.pat, self.fail, self.state = pat, fail, 0


class StopMatcher:
    """Finds the first stop string in generated text, holding back text that could be the start of one.

    ``push`` returns ``(text_safe_to_emit, stopped)``. Once stopped, the text up to (not including) the stop string
    has been emitted and nothing more will be. The stop that completes first wins (the longest, if several complete
    on the same character), however the text is split into pushes. Each character is looked at once per stop
    string (``scanned`` counts them), so the work grows with the output, never with the output so far or with
    the square of a stop string's length; the held tail is shorter than the longest stop string.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [_Stop(s) for s in stops if s]
        self._held = ""
        self.scanned = 0  # characters examined so far, over all pushes

    def push(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        self.scanned += len(text)
        for i, ch in enumerate(text):
            done = 0
            for st in self._stops:
                pat, k = st.pat, st.state
                while k and pat[k] != ch:
                    k = st.fail[k - 1]
                if pat[k] == ch:
                    k += 1
                st.state = k
                if k == len(pat) and k > done:
                    done = k
            if done:
                buf = self._held + text[: i + 1]
                self._held = ""
                return buf[: len(buf) - done], True
        hold = max(st.state for st in self._stops)
        buf = self._held + text
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self._held = self._held, ""
        for st in self._stops:
            st.state = 0
        return out
