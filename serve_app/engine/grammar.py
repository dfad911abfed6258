"""Grammars: a ``GrammarSpec`` compiled to GBNF (cached), validated by llama.cpp, and one sampler per sequence.

Compiling is blocking work (the JSON-schema converter is Python; llama.cpp parses the GBNF): the caller runs
``compile_grammar`` on a worker thread before the request takes a slot, so a bad schema is a 400 that costs the
engine nothing. The GBNF text (or the problem with the spec) is cached by the spec's hash, so a schema sent with
every request is converted once; each request still gets its own llama.cpp grammar state.

Sampling is "sample first": the token the sampler would pick anyway is checked alone against the grammar (a
one-candidate array), and only when the grammar rejects it is the full mask applied to the row and the token picked
again, as llama.cpp's common sampler does. Checking one token costs microseconds; the full mask walks every piece of
the vocabulary through the grammar's stacks (milliseconds at 32k tokens, more at 262k).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from serve_app.errors import InvalidRequestError
from serve_app.protocol import GrammarSpec

from .lazy import TriggerWatch
from .llama import lib
from .utf8mask import Utf8Table

if TYPE_CHECKING:
    from .llama import LlamaModelHandle, SamplerChain

MAX_SCHEMA_CHARS = 64 * 1024  # a JSON schema's serialised size
MAX_GBNF_CHARS = 128 * 1024  # a grammar's size, given or converted: bounds llama.cpp's parse and stack building
CACHE_SIZE = 256
PREFILTER, PREFILTER_MIN = 4, 64  # a refused pick is first looked for among the row's best tokens (``allowed``)
MAX_NESTING = 64  # llama.cpp parses groups recursively: a deeper grammar could overflow the replica's stack
ROOT = "root"
# JSON-schema keywords the converter silently ignores: a schema that uses one would not be enforced, so it is
# refused rather than answered with output that may not validate.
UNSUPPORTED = frozenset({
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems", "not", "if",
    "then", "else", "dependentRequired", "dependentSchemas", "patternProperties", "propertyNames",
    "minProperties", "maxProperties", "contains", "minContains", "maxContains", "unevaluatedProperties",
    "unevaluatedItems", "$dynamicRef",
})
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_CHAR_FIX = r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
_IDENT = re.compile(r"[a-zA-Z0-9_-]+")
_REGEX_SPECIAL = re.compile(r"[.^$|()*+?\[\]{}\\]")


@dataclass(frozen=True)
class GrammarText:
    """A spec compiled to what llama.cpp takes: GBNF text with start rule ``root`` and, for a lazy grammar, the
    trigger regexes (ECMAScript, as llama.cpp's std::regex reads them)."""

    gbnf: str
    patterns: tuple[str, ...] = ()


# ---- spec -> GBNF (pure, cached) ---------------------------------------------------------------------------------


def spec_key(spec: GrammarSpec) -> str:
    return hashlib.sha256(json.dumps(spec.model_dump(), sort_keys=True).encode()).hexdigest()


def _param(spec: GrammarSpec) -> str:
    return "grammar" if spec.gbnf is not None else "response_format"


def check_schema(schema: Any, where: str = "schema") -> None:
    """Refuse what the converter would not enforce: walks the schema positions only (a property may be named
    ``minimum``)."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ValueError(f"{where} must be an object")
    bad = sorted(UNSUPPORTED & schema.keys())
    if bad:
        raise ValueError(f"{where} uses '{bad[0]}', which structured output cannot enforce")
    if "pattern" in schema and ("minLength" in schema or "maxLength" in schema):
        raise ValueError(f"{where} combines 'pattern' with a length bound, which cannot be enforced together")
    ref = schema.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
        raise ValueError(f"{where} has a remote '$ref' ({str(ref)[:80]}); only local '#/...' references work")
    for key in _SUBSCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items():
            check_schema(sub, f"{where}.{key}.{name}")
    for key in _SUBSCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key) or []):
            check_schema(sub, f"{where}.{key}[{i}]")
    for key in ("items", "additionalProperties"):
        sub = schema.get(key)
        if isinstance(sub, dict):
            check_schema(sub, f"{where}.{key}")
        elif isinstance(sub, list):
            for i, s in enumerate(sub):
                check_schema(s, f"{where}.{key}[{i}]")


def schema_to_gbnf(schema: dict[str, Any]) -> str:
    from llama_cpp.llama_grammar import PRIMITIVE_RULES, SchemaConverter

    check_schema(schema)
    conv = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    if not schema:  # {} is any JSON value (the converter alone would make it an object)
        conv._add_primitive(ROOT, PRIMITIVE_RULES["value"])
        return str(conv.format_grammar())
    resolved = conv.resolve_refs(json.loads(json.dumps(schema)), "input")
    conv.visit(resolved, "")
    # The converter's string character admits raw control characters, which JSON (and pydantic, and Python's
    # json.loads) refuse inside strings: exclude them, as llama.cpp's own JSON grammar does.
    return "\n".join(_CHAR_FIX if line.startswith("char ::= ") else line
                     for line in str(conv.format_grammar()).split("\n"))


def gbnf_literal(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\[]':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _tokens(gbnf: str) -> Iterator[str]:
    """GBNF text in pieces that join back to it: each literal, character class, comment and name whole."""
    i, n = 0, len(gbnf)
    while i < n:
        ch = gbnf[i]
        if ch in '"[':
            close = '"' if ch == '"' else "]"
            j = i + 1
            while j < n and gbnf[j] != close:
                j += 2 if gbnf[j] == "\\" else 1
            yield gbnf[i:j + 1]
            i = j + 1
        elif ch == "#":
            j = gbnf.find("\n", i)
            j = n if j < 0 else j
            yield gbnf[i:j]
            i = j
        elif (m := _IDENT.match(gbnf, i)) is not None:
            yield m.group()
            i = m.end()
        else:
            yield ch
            i += 1


def rename_rule(gbnf: str, old: str, new: str) -> str:
    """``old`` renamed to ``new`` wherever it is a rule name, never inside a literal, a character class or a
    comment."""
    return "".join(new if part == old else part for part in _tokens(gbnf))


def nesting(gbnf: str) -> int:
    """The deepest parenthesised group, outside literals, character classes and comments."""
    deepest = depth = 0
    for part in _tokens(gbnf):
        if part == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif part == ")":
            depth -= 1
    return deepest


def _wrap(body: str, spec: GrammarSpec) -> str:
    """The grammar's own root wrapped in the spec's prefix / suffix, once or repeated."""
    if not (spec.prefix or spec.suffix or spec.repeat):
        return body
    inner = "wrapped-root"
    while re.search(rf"(?<![\w-]){inner}(?![\w-])", body):
        inner += "-x"
    block = " ".join(x for x in (gbnf_literal(spec.prefix) if spec.prefix else "", inner,
                                 gbnf_literal(spec.suffix) if spec.suffix else "") if x)
    top = f"root ::= wrapped-block ([ \\t\\n]{{0,4}} wrapped-block)*\nwrapped-block ::= {block}" if spec.repeat \
        else f"root ::= {block}"
    return f"{top}\n{rename_rule(body, ROOT, inner)}"


def trigger_pattern(triggers: tuple[str, ...]) -> str:
    """Literal trigger texts as one regex whose first group starts where the grammar takes over (llama.cpp's
    own form for trigger words)."""
    alts = "|".join(_REGEX_SPECIAL.sub(lambda m: "\\" + m.group(), t) for t in triggers)
    return f"[\\s\\S]*?({alts})[\\s\\S]*"


def spec_to_text(spec: GrammarSpec) -> GrammarText:
    """The spec as GBNF; raises ``InvalidRequestError`` naming the problem."""
    param = _param(spec)
    try:
        if spec.json_schema is not None:
            if len(json.dumps(spec.json_schema)) > MAX_SCHEMA_CHARS:
                raise ValueError(f"the JSON schema is larger than {MAX_SCHEMA_CHARS} characters")
            body = schema_to_gbnf(spec.json_schema)
        else:
            body = spec.gbnf or ""
        if len(body) > MAX_GBNF_CHARS:
            raise ValueError(f"the grammar is larger than {MAX_GBNF_CHARS} characters")
        if nesting(body) > MAX_NESTING:
            raise ValueError(f"the grammar nests groups deeper than {MAX_NESTING}")
        text = _wrap(body, spec)
    except Exception as e:  # the converter is third-party code: whatever it raises, the schema cannot be used
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        what = "JSON schema" if spec.json_schema is not None else "grammar"
        raise InvalidRequestError(f"the {what} cannot be used for structured output: {msg}", param=param) from None
    return GrammarText(text, (trigger_pattern(spec.triggers),) if spec.triggers else ())


class _Cache:
    """Bounded LRU of compiled texts and of refusals (a bad schema sent again is refused without converting)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[str, GrammarText | InvalidRequestError] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, spec: GrammarSpec) -> GrammarText:
        key = spec_key(spec)
        with self._lock:
            got = self._d.get(key)
            if got is not None:
                self._d.move_to_end(key)
                self.hits += 1
        if got is None:
            self.misses += 1
            try:
                got = spec_to_text(spec)
            except InvalidRequestError as e:
                got = e
            with self._lock:
                self._d[key] = got
                while len(self._d) > self.size:
                    self._d.popitem(last=False)
        if isinstance(got, InvalidRequestError):
            raise InvalidRequestError(got.message, param=got.param)
        return got

    def __len__(self) -> int:
        return len(self._d)


CACHE = _Cache(CACHE_SIZE)


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
    loose = tuple(t for t in spec.triggers if not spec.prefix.startswith(t))
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
    watch = TriggerWatch(spec.triggers, spec.prefix, lambda t: model.piece(t, special=True)) if spec.triggers \
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
