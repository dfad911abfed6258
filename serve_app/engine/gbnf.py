"""A ``GrammarSpec`` as GBNF text: JSON schemas converted (llama-cpp-python's converter, with the keywords it would
silently ignore refused by name), literal prefix/suffix/repeat wrapped around the root rule, trigger patterns for lazy
grammars, size and nesting bounds, and a bounded cache keyed by the spec's hash (refusals cached too), so a schema sent
with every request is converted once. Pure Python: llama.cpp validates the text in ``grammar.compile_grammar``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from serve_app.errors import InvalidRequestError
from serve_app.protocol import GrammarSpec

MAX_SCHEMA_CHARS = 64 * 1024  # a JSON schema's serialised size
MAX_GBNF_CHARS = 128 * 1024  # a grammar's size, given or converted: bounds llama.cpp's parse and stack building
CACHE_SIZE = 256
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


def property_rules(objects: list[tuple[dict[str, Any], list[str]]]) -> tuple[str, list[dict[str, str]]]:
    """GBNF rules for chosen properties of several object schemas (each a tool's parameters) in one grammar, for a
    caller that writes the rest of it: the rules text (no ``root``) and, per object, each chosen property's rule
    name. One converter for all, so shared primitives are written once and each object's ``$ref``s resolve within
    that object. Raises ``ValueError`` for a schema that cannot be enforced."""
    from llama_cpp.llama_grammar import SchemaConverter

    conv = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    names: list[dict[str, str]] = []
    for i, (schema, props) in enumerate(objects):
        check_schema(schema)
        resolved = conv.resolve_refs(json.loads(json.dumps(schema)), f"tool{i}")
        names.append({p: conv.visit(resolved["properties"][p], f"tool{i}-{j}-value")
                      for j, p in enumerate(props)})
    return "\n".join(_CHAR_FIX if line.startswith("char ::= ") else line
                     for line in str(conv.format_grammar()).split("\n")), names


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
    """The grammar's own root wrapped in the spec's prefix / suffix, once or repeated, after its lead (once)."""
    if not (spec.lead or spec.prefix or spec.suffix or spec.repeat):
        return body
    inner = "wrapped-root"
    while re.search(rf"(?<![\w-]){inner}(?![\w-])", body):
        inner += "-x"
    block = " ".join(x for x in (gbnf_literal(spec.prefix) if spec.prefix else "", inner,
                                 gbnf_literal(spec.suffix) if spec.suffix else "") if x)
    lead = f"{gbnf_literal(spec.lead)} " if spec.lead else ""
    top = f"root ::= {lead}wrapped-block ([ \\t\\n]{{0,4}} wrapped-block)*\nwrapped-block ::= {block}" \
        if spec.repeat else f"root ::= {lead}{block}"
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
