"""Tool calls in the XML shape of Qwen3-Coder, Qwen3.5 and Nemotron Nano 3 templates, per call::

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

A parameter's value is raw text up to the first ``</parameter>`` (one newline after the opening tag and one before
the closing tag belong to the layout, not the value). Like llama-server and vLLM, a value whose schema type is not
``string`` is read as JSON when it parses and kept as text when it does not: the text is what the model meant when
its JSON is broken, and a client sees it rather than nothing. Types come from the request's tools, so the parser
is built per request.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from serve_app.protocol import Tool

from .calls import NotACall, ParsedCall

OPEN_CALL = "<tool_call>"
CLOSE_CALL = "</tool_call>"
OPEN_FN = "<function="
CLOSE_FN = "</function>"
OPEN_PARAM = "<parameter="
CLOSE_PARAM = "</parameter>"
# A name longer than this is prose that happens to contain "<function=": give it back without waiting for a '>'.
MAX_NAME = 256

Triggers = tuple[tuple[str, bool], ...]
Extract = Callable[[str, bool], tuple[list[ParsedCall], str] | None]


class _Wait(Exception):
    """The block may still complete: wait for more text."""


_PY_LITERALS = {"True": True, "False": False, "None": None}  # models trained on Python write these for JSON's
_NOT_JSON = object()


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)  # NaN and Infinity parse in Python but are not JSON: arguments must stay valid JSON


def _json(text: str) -> Any:
    if text in _PY_LITERALS:
        return _PY_LITERALS[text]
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):  # thousands of '[' exhaust the decoder's recursion: text, not an error
        return _NOT_JSON


def _target(ref: Any, root: Any) -> Any:
    """A local ``#/a/b`` reference's schema in ``root``; None for anything else."""
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return None
    node = root
    for part in ref[2:].split("/"):
        node = node.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(node, dict) else None
    return node


def value_types(schema: Any, root: Any = None, depth: int = 0) -> set[str]:
    """The JSON types a parameter's schema admits, from ``type``, ``enum``/``const`` values, ``anyOf``/``oneOf``
    members and local ``$ref``s into ``root`` (the tool's parameters); empty when it says nothing (the value is
    then taken as text, as vLLM does)."""
    if not isinstance(schema, dict) or depth > 16:  # bounded: references may cycle
        return set()
    out: set[str] = set()
    t = schema.get("type")
    out.update([t] if isinstance(t, str) else [x for x in t if isinstance(x, str)] if isinstance(t, list) else [])
    values = list(schema.get("enum") or []) + ([schema["const"]] if "const" in schema else [])
    out.update(_type_of(v) for v in values)
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            out |= value_types(sub, root, depth + 1)
    if "$ref" in schema:
        out |= value_types(_target(schema["$ref"], root), root, depth + 1)
    return out


def _type_of(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return {float: "number", str: "string", dict: "object", list: "array"}.get(type(value), "null")


def _fits(value: Any, types: set[str]) -> bool:
    t = _type_of(value)
    return t in types or (t == "integer" and "number" in types)


def convert(raw: str, schema: Any, root: Any = None) -> Any:
    """A parameter's value from its raw text and its schema (None: a parameter the tool does not declare)."""
    text = raw[1:] if raw.startswith("\n") else raw
    text = text[:-1] if text.endswith("\n") else text
    types = value_types(schema, root)
    if not types or types == {"string"}:
        return text
    value = _json(text.strip())
    if value is _NOT_JSON or ("string" in types and not _fits(value, types - {"string"})):
        return text  # a string-or-something value is a string unless it parses as one of the other types
    return value


def _ws(buf: str, pos: int) -> int:
    n = len(buf)
    while pos < n and buf[pos] in " \t\r\n":
        pos += 1
    return pos


def _expect(buf: str, pos: int, lit: str, final: bool) -> int:
    if buf.startswith(lit, pos):
        return pos + len(lit)
    if not final and lit.startswith(buf[pos:pos + len(lit)]) and len(buf) - pos < len(lit):
        raise _Wait
    raise NotACall(f"expected {lit!r}")


def _name(buf: str, pos: int) -> tuple[str, int]:
    """The name up to '>' (a tag's name never spans lines or holds '<')."""
    end = buf.find(">", pos, pos + MAX_NAME + 1)
    head = buf[pos:end if end >= 0 else pos + MAX_NAME + 1]
    if "\n" in head or "<" in head:
        raise NotACall("a tag's name is not closed by '>'")
    if end < 0:
        if len(buf) - pos > MAX_NAME:
            raise NotACall("a tag's name is too long")
        raise _Wait
    name = head.strip()
    if not name:
        raise NotACall("a tag without a name")
    return name, end + 1


def _tail_of(lits: tuple[str, ...], rest: str) -> bool:
    return any(lit.startswith(rest) for lit in lits)


class XmlCalls:
    """The extractor of one request: fed the text from just after ``<tool_call>`` (or from a bare
    ``<function=NAME>`` for a known tool, which Qwen3-Coder sometimes writes without the outer tag).

    The caller passes the same open block again, longer, until a call or ``NotACall`` comes out: what is settled
    (the name, whole parameters, how far a value was searched for its closing tag) is kept between calls, so a
    long value streamed token by token is scanned once, not once per token."""

    def __init__(self, tools: tuple[Tool, ...]) -> None:
        self.props: dict[str, dict[str, Any]] = {}
        self.roots: dict[str, dict[str, Any]] = {}
        for t in tools:
            params = t.function.parameters or {}
            props = params.get("properties")
            self.props[t.function.name] = props if isinstance(props, dict) else {}
            self.roots[t.function.name] = params
        self._reset()

    def _reset(self) -> None:
        self._name: str | None = None  # the open block's function, once read
        self._args: dict[str, Any] = {}
        self._pos = 0  # where the next parameter (or </function>) starts
        self._searched = 0  # the pending value holds no closing tag before this position

    @property
    def triggers(self) -> Triggers:
        return ((OPEN_CALL, False), *((f"{OPEN_FN}{name}>", True) for name in self.props))

    def __call__(self, buf: str, final: bool) -> tuple[list[ParsedCall], str] | None:
        try:
            got = self._block(buf, final)
        except _Wait:
            if not final:
                return None
            self._reset()
            raise NotACall("the call is not closed") from None
        except NotACall:
            self._reset()
            raise
        self._reset()
        return got

    def _block(self, buf: str, final: bool) -> tuple[list[ParsedCall], str]:
        if self._name is None:
            pos = _expect(buf, _ws(buf, 0), OPEN_FN, final)
            self._name, self._pos = _name(buf, pos)
        props, root = self.props.get(self._name, {}), self.roots.get(self._name)
        while True:
            pos = _ws(buf, self._pos)
            if buf.startswith(CLOSE_FN, pos):
                pos += len(CLOSE_FN)
                break
            if not buf.startswith(OPEN_PARAM, pos):
                if not final and _tail_of((CLOSE_FN, OPEN_PARAM), buf[pos:]):
                    raise _Wait
                raise NotACall("expected a <parameter=...> or </function>")
            key, pos = _name(buf, pos + len(OPEN_PARAM))
            end = buf.find(CLOSE_PARAM, max(pos, self._searched))
            if end < 0:
                self._searched = max(pos, len(buf) - len(CLOSE_PARAM) + 1)
                raise _Wait
            self._args[key] = convert(buf[pos:end], props.get(key), root)
            self._pos = end + len(CLOSE_PARAM)
            self._searched = 0
        pos = _ws(buf, pos)
        if buf.startswith(CLOSE_CALL, pos):
            pos += len(CLOSE_CALL)
        elif not final and CLOSE_CALL.startswith(buf[pos:]):
            raise _Wait  # the closing tag may still come (it is optional: a bare <function=...> has none)
        return [ParsedCall(self._name, json.dumps(self._args, ensure_ascii=False))], buf[pos:]


def xml_rules(tools: tuple[Tool, ...]) -> tuple[Triggers, Extract]:
    calls = XmlCalls(tools)
    return calls.triggers, calls
