"""One engine step's bookkeeping: the slots (a context sequence each), the batch built from them, the positions
advanced after ``llama_decode``, and the greedy tokens read from its logits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .generation import Generation
from .prefix import EMPTY

if TYPE_CHECKING:
    from .batch import NpBatch
    from .llama import LlamaContextHandle


@dataclass
class Slot:
    """One sequence of the context: the generation running in it and how far its KV has got."""

    seq: int
    gen: Generation | None = None
    prompt: np.ndarray | None = None  # what is prefilled: the prompt (+ the output so far, on resume)
    n_prefilled: int = 0
    n_past: int = 0
    i_batch: int = -1
    pending_prefill: int = 0
    pending_decode: bool = False
    cache: np.ndarray = field(default_factory=lambda: EMPTY)  # the tokens this sequence's KV holds while the slot is idle (prefix.py)
    # Copies of the SWA part of the KV at earlier positions (position, state), oldest first (prefix.py).
    checkpoints: list[tuple[int, bytes]] = field(default_factory=list)
    last_used: float = 0.0  # when its last generation left (time.monotonic): least recently used goes first

    @property
    def busy(self) -> bool:
        return self.gen is not None

    @property
    def generating(self) -> bool:
        return self.gen is not None and self.prompt is not None and self.n_prefilled >= len(self.prompt)

    def reset(self) -> None:
        """Back to idle, once the generation has left (finished, failed or paused); its KV is what ``cache``
        says (prefix.py keeps or forgets it)."""
        self.gen = self.prompt = None
        self.n_prefilled = self.n_past = self.pending_prefill = 0
        self.pending_decode = False
        self.i_batch = -1


def admitted(s: Slot) -> float:
    """Sort key: when the slot's generation was first admitted."""
    return s.gen.t_admit if s.gen is not None else 0.0


def build_batch(b: NpBatch, slots: list[Slot], prefill_chunk: int) -> list[Slot]:
    """Every generating slot's next token, then up to ``prefill_chunk`` prompt tokens in admission order; returns
    the slots whose logits this step produces, in batch order."""
    b.clear()
    with_logits: list[Slot] = []
    for s in slots:
        if s.generating:
            assert s.gen is not None
            s.i_batch = b.add_one(s.gen.out_tokens[-1], s.n_past, s.seq)
            s.pending_decode = True
            with_logits.append(s)
    budget = min(prefill_chunk, b.room)
    for s in sorted((s for s in slots if s.busy and not s.generating), key=admitted):
        if budget <= 0:
            break
        assert s.prompt is not None
        take = min(budget, len(s.prompt) - s.n_prefilled)
        last = s.n_prefilled + take == len(s.prompt)
        i = b.add(s.prompt[s.n_prefilled:s.n_prefilled + take], s.n_prefilled, s.seq, last)
        s.pending_prefill = take
        budget -= take
        if last:
            s.i_batch = i
            with_logits.append(s)
    return with_logits


def advance_positions(slots: list[Slot]) -> int:
    """After a successful decode: move every slot past what the batch held; returns the prompt tokens read."""
    prefilled = 0
    for s in slots:
        if s.pending_decode:
            s.n_past += 1
            s.pending_decode = False
        if s.pending_prefill:
            s.n_prefilled += s.pending_prefill
            s.n_past += s.pending_prefill
            prefilled += s.pending_prefill
            s.pending_prefill = 0
    return prefilled


def greedy_tokens(ctx: LlamaContextHandle, n_vocab: int, with_logits: list[Slot]) -> np.ndarray:
    """Argmax of every greedy row in one vectorised call over llama.cpp's output matrix (rows are the
    logits-requesting tokens in batch order, which is ``with_logits``' order), so per-sequence host work does not
    grow with the batch: on a GPU it would otherwise rival the decode itself."""
    rows = [j for j, s in enumerate(with_logits) if s.gen is not None and s.gen.sampler is None]
    out = np.zeros(len(with_logits), dtype=np.int64)
    if rows:
        mat = ctx.all_logits(len(with_logits), n_vocab)
        out[rows] = np.argmax(mat[rows], axis=1)
    return out
