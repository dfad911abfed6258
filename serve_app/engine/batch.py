"""A ``llama_batch`` whose arrays are owned by numpy, so filling it is vectorised instead of one ctypes store
per field per token (measured: that is most of the Python time in a naive loop)."""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .llama import lib


class NpBatch:
    def __init__(self, capacity: int) -> None:
        L = lib()
        self.capacity = capacity
        self.token = np.zeros(capacity, np.int32)
        self.pos = np.zeros(capacity, np.int32)
        self.n_seq_id = np.ones(capacity, np.int32)
        self.seq_id_data = np.zeros(capacity, np.int32)
        self.logits = np.zeros(capacity, np.int8)
        base = self.seq_id_data.ctypes.data
        p_int = ctypes.POINTER(ctypes.c_int32)
        self._ptrs = (p_int * capacity)(*[ctypes.cast(base + 4 * i, p_int) for i in range(capacity)])
        b = self.batch = L.llama_batch()
        b.token = self.token.ctypes.data_as(p_int)
        b.embd = ctypes.POINTER(ctypes.c_float)()
        b.pos = self.pos.ctypes.data_as(p_int)
        b.n_seq_id = self.n_seq_id.ctypes.data_as(p_int)
        b.seq_id = ctypes.cast(self._ptrs, ctypes.POINTER(p_int))
        b.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    @property
    def room(self) -> int:
        return self.capacity - self.n

    def add(self, tokens: NDArray[np.int32] | list[int], pos0: int, seq_id: int, want_last_logits: bool) -> int:
        """Append a run of one sequence's tokens; returns the batch index of the last one."""
        i0, i1 = self.n, self.n + len(tokens)
        self.token[i0:i1] = tokens
        self.pos[i0:i1] = np.arange(pos0, pos0 + len(tokens), dtype=np.int32)
        self.seq_id_data[i0:i1] = seq_id
        self.logits[i0:i1] = 0
        if want_last_logits:
            self.logits[i1 - 1] = 1
        self.n = i1
        return i1 - 1

    def add_one(self, token: int, pos: int, seq_id: int) -> int:
        i = self.n
        self.token[i] = token
        self.pos[i] = pos
        self.seq_id_data[i] = seq_id
        self.logits[i] = 1
        self.n = i + 1
        return i

    def full(self) -> Any:
        """The ``llama_batch`` over everything added since ``clear``."""
        self.batch.n_tokens = self.n
        return self.batch
