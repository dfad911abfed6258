"""Host-memory prompt cache beyond the slots (llama-server's ``--cache-ram``): when an idle slot's cached sequence
is about to be lost (a request with another prefix takes the slot, or a full unified KV evicts it), a copy of its
state (``llama_state_seq_get_data``) is kept in RAM with its token list, in a byte-bounded LRU. A later request
whose prompt shares a clearly longer prefix with a saved copy than with any slot gets it loaded back into its slot
(``llama_state_seq_set_data``); ``prefix.py`` then drops the diverging tail as for any cached slot.

Loading is a copy of the whole saved state, so it pays only when it spares enough prefill (see ``MIN_GAIN``,
measured by ``bench/bench_hostcache.py``). With a window-sized SWA cache a saved state holds only the window the
slot held, so a copy is offered only where the same rule as for a slot allows its reuse (``usable``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .prefix import common_prefix, window_usable

if TYPE_CHECKING:
    from .llama import LlamaContextHandle

# A sequence shorter than this is cheaper to prefill again than to copy out and back.
MIN_TOKENS = 64
# A saved copy replaces the slot's own prefix only when it spares at least this share of the copy's tokens (and
# MIN_TOKENS): loading copies all of them, prefill computes only the tokens gained. Measured on a 2-core CPU
# (bench/bench_hostcache.py): loading 512-3000 tokens takes 0.1-0.6 % of the time prefilling them does.
MIN_GAIN = 0.02


@dataclass
class Saved:
    tokens: np.ndarray  # what the saved KV holds, position for position
    state: bytes
    pos_min: int  # the first position its SWA layers held (0 without a window)


class HostCache:
    """Saved sequence states, least recently used first, holding at most ``max_bytes`` of state in all."""

    def __init__(self, ctx: LlamaContextHandle, max_bytes: int) -> None:
        self.ctx = ctx
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, Saved] = OrderedDict()
        self.bytes = 0
        self.saves = self.restores = self.restored_tokens = 0
        self._keys = 0

    def save(self, seq: int, tokens: np.ndarray) -> None:
        """Copy ``seq``'s state (holding ``tokens``) into the cache, dropping the oldest copies to make room. A copy
        whose tokens this one extends is replaced; one that already extends these tokens is only refreshed."""
        if len(tokens) < MIN_TOKENS:
            return
        for k, e in list(self.entries.items()):
            n = common_prefix(e.tokens, tokens)
            if n == len(tokens):
                self.entries.move_to_end(k)
                return
            if n == len(e.tokens):
                self._drop(k)
        state = self.ctx.seq_state(seq)
        if not state or len(state) > self.max_bytes:
            return
        while self.bytes + len(state) > self.max_bytes:
            self._drop(next(iter(self.entries)))
        self._keys += 1
        # A copy holds only the unmasked part of a window-sized SWA cache (older cells may still sit in the slot,
        # but are not saved): loaded back, it starts n_swa positions before its end.
        pos_min = max(0, self.ctx.seq_pos_min(seq), len(tokens) - self.ctx.n_swa if self.ctx.n_swa else 0)
        self.entries[self._keys] = Saved(tokens.copy(), state, pos_min)
        self.bytes += len(state)
        self.saves += 1

    def best(self, tokens: np.ndarray, n_swa: int) -> tuple[int, int]:
        """The saved copy sharing the longest usable prefix with ``tokens`` (all but its last token may be kept):
        its key and that length; (0, 0) when none."""
        best_k, best_n = 0, 0
        for k, e in self.entries.items():
            n = min(common_prefix(e.tokens, tokens), len(tokens) - 1)
            if n > best_n and window_usable(e.pos_min, n, n_swa):
                best_k, best_n = k, n
        return best_k, best_n

    def worth(self, key: int, n_gain: int, n_slot: int) -> bool:
        """Whether loading copy ``key`` (``n_gain`` tokens shared) beats keeping the slot's ``n_slot`` tokens."""
        return n_gain - n_slot >= max(MIN_TOKENS, MIN_GAIN * len(self.entries[key].tokens))

    def restore(self, e: Saved, seq: int) -> np.ndarray | None:
        """Load copy ``e`` into the (emptied) sequence ``seq``; the tokens it holds, or None when llama.cpp could
        not (a unified KV with no room: the sequence is left empty). The copy may have left the cache meanwhile."""
        if not self.ctx.set_seq_state(seq, e.state):
            self.ctx.free_seq(seq)
            return None
        for k, other in self.entries.items():
            if other is e:
                self.entries.move_to_end(k)
                break
        self.restores += 1
        return e.tokens

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def _drop(self, key: int) -> None:
        self.bytes -= len(self.entries.pop(key).state)
