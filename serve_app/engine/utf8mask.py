"""Which tokens keep the output valid UTF-8, per token, for each decoder state (bytes still owed, and their range).

llama.cpp's grammar works on code points and lets byte-fallback tokens through that do not form valid UTF-8 (a lead
byte followed by another lead byte): the text then decodes with replacement characters, so a JSON string the
grammar counted as 6 characters comes out longer, and its ``maxLength`` fails. Constrained sampling also asks this
table, so what the grammar accepts is exactly what the client decodes. Built once per model (ASCII pieces, most of a
vocabulary, take the fast path). No llama.cpp here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# A state is the continuation bytes still owed (0-3), or one of the four lead bytes whose next byte has a narrower
# range (no overlong forms, no surrogates, nothing past U+10FFFF): the state index and what follows it.
_NARROW = {0xE0: (4, 0xA0, 0xBF, 1), 0xED: (5, 0x80, 0x9F, 1), 0xF0: (6, 0x90, 0xBF, 2), 0xF4: (7, 0x80, 0x8F, 2)}
_RANGES = {s: (lo, hi, rest) for s, lo, hi, rest in _NARROW.values()}
N_STATES = 8


def _advance(piece: bytes, state: int) -> int:
    """The state after ``piece``, or -1 when it breaks UTF-8."""
    for c in piece:
        if state >= 4:
            lo, hi, rest = _RANGES[state]
            if not lo <= c <= hi:
                return -1
            state = rest
        elif state:
            if c & 0xC0 != 0x80:
                return -1
            state -= 1
        elif c >= 0x80:
            if c in _NARROW:
                state = _NARROW[c][0]
            elif 0xC2 <= c <= 0xDF:
                state = 1
            elif 0xE1 <= c <= 0xEF:
                state = 2
            elif 0xF1 <= c <= 0xF3:
                state = 3
            else:
                return -1
    return state


class Utf8Table:
    """Per token of a vocabulary: ``after[state, tok]``, the UTF-8 state once ``tok`` follows (-1 where it breaks
    UTF-8); ``first_byte[tok]`` (-1: an empty piece); ``byte_token[b]``, a token whose piece is the one byte ``b``
    (-1: none); ``eog``, the end-of-generation tokens."""

    def __init__(self, n_vocab: int, piece: Callable[[int], bytes],
                 is_eog: Callable[[int], bool] = lambda _t: False) -> None:
        after = np.full((N_STATES, n_vocab), -1, dtype=np.int8)
        self.first_byte = np.full(n_vocab, -1, dtype=np.int16)
        self.second_byte = np.full(n_vocab, -1, dtype=np.int16)  # -1: a piece of one byte (or none)
        self.byte_token = np.full(256, -1, dtype=np.int32)
        eog = []
        for tok in range(n_vocab):
            p = piece(tok)
            if is_eog(tok):
                eog.append(tok)
            elif p:
                self.first_byte[tok] = p[0]
                if len(p) > 1:
                    self.second_byte[tok] = p[1]
                if len(p) == 1 and self.byte_token[p[0]] < 0:
                    self.byte_token[p[0]] = tok
            if p.isascii():
                after[0, tok] = 0  # owing nothing, ASCII keeps owing nothing; owing bytes, it breaks
                continue
            for state in range(N_STATES):
                after[state, tok] = _advance(p, state)
        self.after = after
        self.eog = np.array(eog, dtype=np.int32)
        # First bytes no single-byte token stands for: their tokens are always candidates (see ``candidates``).
        self.unrepresented = self.byte_token < 0
        # The first byte most pieces share (a space, in most vocabularies): its class is split by the second byte.
        counts = np.bincount(self.first_byte[self.first_byte >= 0], minlength=256)
        top = int(np.argmax(counts))
        self.common_first = top if counts[top] * 4 > n_vocab and top < 0x80 and self.byte_token[top] >= 0 else -1

    def candidates(self, ok_first: np.ndarray, ok_second: np.ndarray | None = None) -> np.ndarray:
        """Tokens that could be allowed when ``ok_first`` (a bool per byte) are the first bytes the grammar
        takes (and ``ok_second`` the bytes it takes after ``common_first``): those starting so, or with bytes no
        single-byte token stands for, and EOG."""
        first = ok_first | self.unrepresented
        keep = (self.first_byte >= 0) & first[np.maximum(self.first_byte, 0)]
        if ok_second is not None:
            second = ok_second | self.unrepresented
            split = self.first_byte == self.common_first
            keep &= ~split | (self.second_byte < 0) | second[np.maximum(self.second_byte, 0)]
        return np.concatenate([np.flatnonzero(keep).astype(np.int32), self.eog])

    def ok(self, state: int, tok: int) -> bool:
        return bool(self.after[state, tok] >= 0)

    def mask(self, state: int, ids: np.ndarray) -> np.ndarray:
        return self.after[state, ids] >= 0

    def next(self, state: int, tok: int) -> int:
        return max(0, int(self.after[state, tok]))
