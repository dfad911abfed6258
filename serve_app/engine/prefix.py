"""Prompt caching across requests: a finished sequence's KV stays in its slot, and the next request goes to the
free slot whose cached tokens share the longest prefix with its prompt, prefilling only the rest.

What a slot caches is the token list its KV holds, position for position (``Slot.cache``). A reuse keeps the
common prefix and removes the diverging tail with ``llama_memory_seq_rm``; llama.cpp itself says whether that
is possible:

- the last prompt token is always decoded again (its logits pick the first new token), so at most
  ``len(prompt) - 1`` tokens are reused;
- recurrent and hybrid memories cannot drop a tail (``seq_rm`` returns false): full prefill;
- with a small sliding-window cache (``swa_full`` off) the SWA layers keep only the last window of positions, so a
  prefix is reusable only while the window in front of its end is still held (``llama_memory_seq_pos_min``, the
  rule llama-server applies); otherwise: full prefill, never a prefix attended through a hole.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .hostcache import HostCache
    from .llama import LlamaContextHandle
    from .step import Slot

EMPTY = np.zeros(0, dtype=np.int32)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays (vectorised: prompts run to thousands)."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


# A cached prefix shorter than this share of the prompt is a miss (llama-server's --slot-prompt-similarity): a
# shared BOS and a word must not evict a long cache that an empty or older slot would have spared.
MIN_SHARE = 0.1
MIN_REUSE = 32  # nor is a prefix of fewer tokens than this: too short to spare measurable prefill

# SWA checkpoints per slot and their spacing in prompt tokens: the last CHECKPOINTS * CHECKPOINT_EVERY tokens of a
# prompt can be diverged from (a different user message after a shared system prompt).
CHECKPOINTS = 4
CHECKPOINT_EVERY = 256
PARTIAL_ONLY = 1  # LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY: only the SWA (or recurrent) part of a sequence's state


def pick_slot(free: Sequence[Slot], tokens: np.ndarray, use_cache: bool) -> tuple[Slot, int]:
    """The free slot with the longest cached prefix of ``tokens`` and that prefix's length; ties and misses go to
    the least recently used slot (its cache is the least likely to be asked for again)."""
    lru = min(free, key=lambda s: s.last_used)
    if not use_cache:
        return lru, 0
    best, best_n = lru, 0
    floor = max(MIN_REUSE, MIN_SHARE * len(tokens))
    for s in sorted(free, key=lambda s: s.last_used):
        n = common_prefix(s.cache, tokens)
        if n > best_n and n >= floor:
            best, best_n = s, n
    # A miss starts the least recently used slot from empty: keeping the few tokens it happens to share (a BOS and
    # a template header) spares nothing, and measured on this CPU it made every later decode step of the batch
    # 30-40 % slower (bench_throughput, 8-16 sequences), where a cleared slot does not.
    return best, best_n


def window_usable(pos_min: int, n: int, n_swa: int) -> bool:
    """Whether a sequence whose SWA layers start at ``pos_min`` may keep its first ``n`` tokens: llama-server's rule
    (its ``pos_min_thold``), where a cache holding position 0 has dropped nothing."""
    # The token at position n attends to positions above n - n_swa (llama.cpp's is_masked_swa), so holding from
    # n - n_swa on is enough.
    return n_swa <= 0 or pos_min == 0 or 0 <= pos_min <= max(0, n - n_swa)


@dataclass
class PrefixCache:
    """The reuse rules for one context: which prefix of a slot's cache a new sequence may keep."""

    ctx: LlamaContextHandle
    n_swa: int  # the model's sliding window when the SWA layers hold only a window (swa_full off); else 0
    host: HostCache | None = None  # saved sequence states beyond the slots (hostcache.py); None: off
    reused_tokens: int = 0  # prompt tokens not computed thanks to a cached prefix (all admissions)
    refused: int = 0  # admissions whose matching prefix llama.cpp could not keep (SWA window, recurrent memory)
    checkpoint_restores: int = 0  # admissions that rolled the SWA layers back to a checkpoint

    def reuse(self, s: Slot, tokens: np.ndarray, n_match: int, use_cache: bool = True) -> int:
        """Keep the first ``n_match`` cached tokens of ``s`` for a sequence that will hold ``tokens`` (at most all
        but the last), drop the rest of its KV, and return how many were kept. With a host cache: the slot's
        sequence is saved first when most of it would be lost, and a saved copy sharing a clearly longer prefix is
        loaded in its place."""
        if self.host is not None and len(tokens) > 1:
            n_match = self._from_host(s, tokens, n_match) if use_cache else self._stash_if_lost(s, n_match)
        n = min(n_match, len(tokens) - 1, len(s.cache))
        if n > 0 and not self._window_held(s.seq, n):
            n = self._from_checkpoint(s, n)
        if n > 0 and not self.ctx.seq_rm_tail(s.seq, n):
            n, self.refused = 0, self.refused + 1
        if n == 0:
            self.ctx.free_seq(s.seq)
            s.cache = EMPTY
        else:
            s.cache = s.cache[:n]
        s.checkpoints = [c for c in s.checkpoints if c[0] <= n]
        self.reused_tokens += n
        return n

    def report(self) -> dict[str, int]:
        """For /stats: SWA checkpoint restores, refused reuses, and the host cache's size and traffic."""
        out = {"checkpoint_restores": self.checkpoint_restores, "refused": self.refused}
        h = self.host
        if h is not None:
            out |= {"ram_bytes": h.bytes, "ram_max_bytes": h.max_bytes, "ram_copies": len(h.entries),
                    "ram_saves": h.saves, "ram_restores": h.restores, "ram_restored_tokens": h.restored_tokens}
        return out

    def _from_checkpoint(self, s: Slot, n: int) -> int:
        """The window in front of ``n`` is gone: roll the SWA layers back to the latest checkpoint at or before
        ``n`` (the full-attention layers keep everything up to it) and return its position; 0 when none."""
        pos = max((c for c in s.checkpoints if c[0] <= n), default=None, key=lambda c: c[0])
        if pos is None or not self.ctx.seq_rm_tail(s.seq, pos[0]) or not self.ctx.set_seq_state(
                s.seq, pos[1], PARTIAL_ONLY):
            self.refused += 1
            return 0
        self.checkpoint_restores += 1
        return pos[0]

    def checkpoint(self, slots: Sequence[Slot]) -> None:
        """After a decode, with a window-sized SWA cache: copy the SWA part of the KV of each slot still reading its
        prompt once it has moved ``CHECKPOINT_EVERY`` tokens past its last copy and beyond the window (before that
        the cache still holds position 0), keeping the last ``CHECKPOINTS`` (llama-server's context checkpoints):
        a later prompt that shares only a prefix of it can restart from there."""
        if self.n_swa <= 0:
            return
        for s in slots:
            if s.prompt is None or s.n_past > len(s.prompt) or s.n_past < self.n_swa:
                continue
            if s.checkpoints and s.n_past - s.checkpoints[-1][0] < CHECKPOINT_EVERY:
                continue
            s.checkpoints.append((s.n_past, self.ctx.seq_state(s.seq, PARTIAL_ONLY)))
            del s.checkpoints[:-CHECKPOINTS]

    def _from_host(self, s: Slot, tokens: np.ndarray, n_match: int) -> int:
        assert self.host is not None
        key, n_host = self.host.best(tokens, self.n_swa)
        if key == 0 or not self.host.worth(key, n_host, n_match):
            return self._stash_if_lost(s, n_match)
        saved = self.host.entries[key]  # held here: saving the slot's own sequence may push it out of the cache
        self.stash(s)
        self.ctx.free_seq(s.seq)
        got = self.host.restore(saved, s.seq)
        s.cache = EMPTY if got is None else got
        s.checkpoints = []  # they were of the sequence just replaced
        if got is None:
            return 0
        self.host.restored_tokens += n_host
        return n_host

    def _stash_if_lost(self, s: Slot, n_keep: int) -> int:
        """Save the slot's sequence when keeping ``n_keep`` of it loses most of it; returns ``n_keep``."""
        if n_keep < len(s.cache) // 2:
            self.stash(s)
        return n_keep

    def stash(self, s: Slot) -> None:
        """Save the idle slot's sequence to the host cache (when there is one) before its KV is lost."""
        if self.host is not None and len(s.cache):
            self.host.save(s.seq, s.cache)

    def _window_held(self, seq: int, n: int) -> bool:
        """Whether the SWA layers still hold the positions a token at ``n`` attends to."""
        return window_usable(self.ctx.seq_pos_min(seq), n, self.n_swa) if self.n_swa > 0 else True

    @staticmethod
    def keep(s: Slot, tokens: list[int]) -> None:
        """After a sequence ends cleanly: its slot's KV holds the first ``s.n_past`` of ``tokens`` (prompt, then
        output; the last sampled token was never decoded)."""
        s.cache = np.asarray(tokens[:s.n_past], dtype=np.int32)
        s.last_used = time.monotonic()

    @staticmethod
    def forget(s: Slot) -> None:
        """The slot's KV was freed (or cannot be trusted): nothing cached."""
        s.cache = EMPTY
        s.checkpoints = []
