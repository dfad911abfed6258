"""Grammars: a ``GrammarSpec`` compiled to GBNF (cached), validated by llama.cpp, and one sampler per sequence.

Compiling is blocking work (the JSON-schema converter is Python; llama.cpp parses the GBNF): the caller runs
``compile_grammar`` on a worker thread before the request takes a slot, so a bad schema is a 400 that costs the
engine nothing. The GBNF text (or the problem with the spec) is made and cached in ``gbnf``; each request still gets
its own llama.cpp grammar state.

Sampling is "sample first": the token the sampler would pick anyway is checked alone against the grammar (a
one-candidate array), and only when the grammar rejects it is the full mask applied to the row and the token picked
again, as llama.cpp's common sampler does. Checking one token costs microseconds; the full mask walks every piece of
the vocabulary through the grammar's stacks (milliseconds at 32k tokens, more at 262k).
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from serve_app.errors import InvalidRequestError
from serve_app.protocol import GrammarSpec

from .gbnf import (
    CACHE,
    ROOT,
    GrammarText,
    _param,
)
from .lazy import TriggerWatch
from .llama import lib
from .utf8mask import Utf8Table

PREFILTER, PREFILTER_MIN = 4, 64  # a refused pick is first looked for among the row's best tokens (``allowed``)

if TYPE_CHECKING:
    from .llama import LlamaModelHandle, SamplerChain


# ---- llama.cpp grammar state, one per sequence --------------------------------------------------------------------


_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


class TokenArray:
    """A ``llama_token_data_array`` over a numpy buffer (filled by numpy, read by llama.cpp's samplers)."""

    def __init__(self, capacity: int) -> None:
        L = lib()
        self.buf = np.zeros(capacity, dtype=_TOKEN_DATA)
        self.arr = L.llama_token_data_array()
        self.ptr = ctypes.pointer(self.arr)
        self._data = self.buf.ctypes.data_as(ctypes.POINTER(L.llama_token_data))

    def load(self, ids: np.ndarray, logits: np.ndarray) -> None:
        n = len(ids)
        self.buf["id"][:n] = ids
        self.buf["logit"][:n] = logits
        self.buf["p"][:n] = 0.0
        self.arr.data, self.arr.size, self.arr.selected, self.arr.sorted = self._data, n, -1, False

    def selected_id(self) -> int:
        # A sampler may point ``data`` elsewhere (its own buffer): read through the struct, not our array.
        return int(self.arr.data[self.arr.selected].id)


class GrammarSampler:
    """One sequence's grammar state. ``choose`` picks the next token honouring it; ``accept`` advances it.

    Owned by one request: built on a worker thread at compile time, then used only by the engine thread. Freed by
    ``close`` or, for a request that never ran (cancelled in the queue), when it is collected."""

    full_mask_always = False  # the reference path, every row masked in full (the benchmark compares); never in service

    def __init__(self, ptr: Any, n_vocab: int, utf8: Utf8Table, watch: TriggerWatch | None = None) -> None:
        L = lib()
        self.ptr = ptr
        self.n_vocab = n_vocab
        self.utf8 = utf8
        self.utf8_state = 0  # where a UTF-8 decoder of the output stands (utf8mask)
        self.lazy = watch is not None
        self.watch = watch  # a lazy grammar's trigger, until it fires
        self._apply, self._accept = L.llama_sampler_apply, L.llama_sampler_accept
        self._one = TokenArray(1)
        self._full: TokenArray | None = None
        self._ids: np.ndarray | None = None
        self._reps: TokenArray | None = None
        self.full_masks = 0  # rows the sampler's pick was refused on (masked: prefiltered or in full)
        self._free = weakref.finalize(self, L.llama_sampler_free, ptr)

    def allows(self, tok: int) -> bool:
        self._one.load(np.array([tok], np.int32), np.zeros(1, np.float32))
        self._apply(self.ptr, self._one.ptr)
        return bool(np.isfinite(self._one.buf["logit"][0])) and self.utf8.ok(self.utf8_state, tok)

    def _mask(self, ids: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        arr = self._full
        if arr is None or len(arr.buf) < len(ids):
            arr = self._full = TokenArray(max(len(ids), 1))
        arr.load(ids, logits)
        self._apply(self.ptr, arr.ptr)
        out = arr.buf["logit"][:len(ids)]
        keep = np.isfinite(out) & self.utf8.mask(self.utf8_state, ids)
        return ids[keep], out[keep].copy()

    def allowed(self, row: np.ndarray, need: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The ids the grammar allows here and their logits: all of them (``need`` 0), or at least the ``need``
        most likely. Those are found among the row's best ``PREFILTER x need`` tokens when that many are allowed
        there, which gives exactly the sampler's choice (greedy, or a chain that starts with top-k) at a fraction
        of the full mask's cost; otherwise the full mask."""
        self.full_masks += 1
        if need > 0 and not self.full_mask_always:
            k = max(PREFILTER_MIN, PREFILTER * need)
            if k < len(row):
                top = np.argpartition(row, len(row) - k)[len(row) - k:].astype(np.int32)
                ids, logits = self._mask(top, row[top])
                if len(ids) >= need:
                    return ids, logits
        if self.full_mask_always:
            if self._ids is None:
                self._ids = np.arange(self.n_vocab, dtype=np.int32)
            return self._mask(self._ids, row)
        # A token is only allowed if its first byte is: ask the grammar about one single-byte token per first byte
        # (at most 256), then about the tokens that start with an allowed one. Exact (a superset goes to the grammar)
        # and, where few bytes may come next (JSON punctuation, a string's closing quote), a small fraction of it.
        t = self.utf8
        ok_first = self._ok_bytes(self.ptr)
        ok_second = None
        if t.common_first >= 0 and ok_first[t.common_first]:
            # Most pieces start with this byte (a space) and the grammar takes it here: ask a copy of the grammar,
            # one byte further on, which bytes may follow it.
            probe = lib().llama_sampler_clone(self.ptr)
            try:
                self._accept(probe, int(t.byte_token[t.common_first]))
                ok_second = self._ok_bytes(probe)
            finally:
                lib().llama_sampler_free(probe)
        cands = t.candidates(ok_first, ok_second)
        return self._mask(cands, row[cands])

    def _ok_bytes(self, grammar: Any) -> np.ndarray:
        """The bytes ``grammar`` takes next, asked of one single-byte token each."""
        t = self.utf8
        reps = t.byte_token[~t.unrepresented]
        arr = self._reps = self._reps if self._reps is not None else TokenArray(256)
        arr.load(reps, np.zeros(len(reps), np.float32))
        self._apply(grammar, arr.ptr)
        ok = np.isfinite(arr.buf["logit"][:len(reps)]) & t.mask(self.utf8_state if grammar is self.ptr else 0, reps)
        out = np.zeros(256, dtype=bool)
        out[t.first_byte[reps[ok]]] = True
        return out

    def choose(self, row: np.ndarray, chain: SamplerChain | None, first: int) -> int:
        """The next token: ``first`` (the greedy pick; ignored with a sampler chain) when the grammar allows it,
        else the best the grammar allows. -1 when the grammar allows no token of this vocabulary. The chain (if
        any) accepts the final token; the grammar does not (``accept``)."""
        if self.watch is not None and not self.watch.fired:
            return self._choose_free(row, chain, first)
        tok = -1
        if not self.full_mask_always:
            tok = chain.pick(np.arange(len(row), dtype=np.int32), row) if chain is not None else first
            if not self.allows(tok):
                tok = -1
        if tok < 0:
            ids, logits = self.allowed(row, need=chain.top_k if chain is not None else 1)
            if not len(ids):
                return -1
            tok = chain.pick(ids, logits) if chain is not None else int(ids[np.argmax(logits)])
        if chain is not None:
            chain.accept(tok)
        return tok

    def _choose_free(self, row: np.ndarray, chain: SamplerChain | None, first: int) -> int:
        """Before a lazy grammar's trigger: the sampler's own pick, unless it would start the grammar on text the
        grammar refuses (see ``lazy``); then the next best, and as a last resort any token that does not."""
        assert self.watch is not None
        ids = np.arange(len(row), dtype=np.int32)
        tok = chain.pick(ids, row) if chain is not None else first
        if self.watch.completes_badly(tok):
            row = row.copy()
            for _ in range(16):
                row[tok] = -np.inf
                tok = chain.pick(ids, row) if chain is not None else int(np.argmax(row))
                if not self.watch.completes_badly(tok):
                    break
            else:
                ok = [t for t in np.argsort(-row) if np.isfinite(row[t]) and not self.watch.completes_badly(int(t))]
                tok = int(ok[0]) if ok else -1
        if chain is not None and tok >= 0:
            chain.accept(tok)
        return tok

    def accept(self, tok: int) -> None:
        if self.watch is not None and not self.watch.fired:
            self.watch.push(tok)
        self.utf8_state = self.utf8.next(self.utf8_state, tok)
        self._accept(self.ptr, tok)

    def close(self) -> None:
        self._free()


def compile_grammar(spec: GrammarSpec, model: LlamaModelHandle) -> GrammarSampler:
    """A fresh grammar state for one request (blocking: run it off the event loop, before taking a slot); raises
    ``InvalidRequestError`` for a spec that does not compile or that llama.cpp refuses."""
    text = CACHE.get(spec)
    loose = tuple(t for t in spec.triggers if not spec.start.startswith(t))
    if loose:
        _check_takes_triggers(spec, text, loose, model)
    L = lib()
    if text.patterns:
        pats = (ctypes.c_char_p * len(text.patterns))(*[p.encode() for p in text.patterns])
        ptr = L.llama_sampler_init_grammar_lazy_patterns(model.vocab, text.gbnf.encode(), ROOT.encode(), pats,
                                                         len(text.patterns), None, 0)
    else:
        ptr = L.llama_sampler_init_grammar(model.vocab, text.gbnf.encode(), ROOT.encode())
    if not ptr:
        what = "grammar" if spec.gbnf is not None else "grammar made from the JSON schema"
        raise InvalidRequestError(
            f"the {what} does not parse (llama.cpp refused it: a syntax error, an undefined rule, a missing "
            f"'root' rule or left recursion)", param=_param(spec))
    watch = TriggerWatch(spec.triggers, spec.start, lambda t: model.piece(t, special=True)) if spec.triggers \
        else None
    return GrammarSampler(ptr, model.n_vocab, utf8_table(model), watch)


def _check_takes_triggers(spec: GrammarSpec, text: GrammarText, triggers: tuple[str, ...],
                          model: LlamaModelHandle) -> None:
    """The grammar is fed the text from a trigger on, and llama.cpp aborts the process on text it refuses: a trigger
    that the literal prefix does not start with must be text the grammar itself takes from its start (checked here,
    token by token on a fresh state, never accepting a refused token)."""
    L = lib()
    for trig in triggers:
        ptr = L.llama_sampler_init_grammar(model.vocab, text.gbnf.encode(), ROOT.encode())
        if not ptr:
            raise InvalidRequestError("the grammar does not parse (llama.cpp refused it)", param=_param(spec))
        probe = GrammarSampler(ptr, model.n_vocab, utf8_table(model))
        try:
            spelled = _spelled(trig, model)
            for tok in spelled or [None]:
                if tok is None or not probe.allows(tok):
                    raise InvalidRequestError(
                        f"the lazy grammar cannot start with its trigger {trig!r}: give a prefix that starts with "
                        f"the trigger, or a grammar whose text starts with it", param=_param(spec))
                probe.accept(tok)
        finally:
            probe.close()


def _spelled(text: str, model: LlamaModelHandle) -> list[int]:
    """Tokens whose pieces join to exactly ``text``: a SentencePiece vocabulary prepends a space to a text tokenized
    on its own, which the grammar would see as output. Character by character when the whole does not come out
    exact; an empty list (nothing can be checked, so the caller refuses) when neither does."""
    def exact(t: str) -> list[int] | None:
        toks = model.tokenize(t, add_special=False, parse_special=True)
        while toks and b"".join(model.piece(x, special=True) for x in toks) != t.encode():
            if model.piece(toks[0], special=True).strip():
                return None
            toks = toks[1:]
        return toks or None

    whole = exact(text)
    if whole is not None:
        return whole
    chars = [exact(c) for c in text]
    return [] if any(c is None for c in chars) else [x for c in chars for x in c or ()]


_tables: weakref.WeakKeyDictionary[Any, Utf8Table] = weakref.WeakKeyDictionary()
_tables_lock = threading.Lock()


def utf8_table(model: LlamaModelHandle) -> Utf8Table:
    """The model's table, built by the first grammar request (on a worker thread) and shared after."""
    with _tables_lock:
        table = _tables.get(model)
        if table is None:
            table = _tables[model] = Utf8Table(model.n_vocab, lambda t: model.piece(t, special=True), model.is_eog)
        return table
