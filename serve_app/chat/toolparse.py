"""Incremental tool-call parsers, one per template family: generated text in, content and whole calls out.

Each parser is fed the text as it streams and hands back what is settled: plain content (held back only while it
might be the start of a trigger) and each call once its JSON is complete. A block that turns out not to be a
call (bad JSON, no name) goes back out as content: text is never lost. Pure: no I/O, no model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serve_app.protocol import Tool

from .calls import NotACall, ParsedCall
from .formats import Family
from .xmlcalls import xml_rules

__all__ = ["NotACall", "ParsedCall", "Piece", "ToolCallParser", "call_from", "decode_json", "parse_generic"]


Piece = str | ParsedCall
# (calls, the rest of the buffer after them) once the block is complete; None: wait for more text.
Extract = Callable[[str, bool], tuple[list[ParsedCall], str] | None]


def _arguments(value: Any) -> str:
    if isinstance(value, str):
        try:
            json.loads(value)
            return value
        except (ValueError, RecursionError):
            raise NotACall("arguments is not JSON") from None
    if not isinstance(value, dict):
        raise NotACall("arguments is not an object")
    return json.dumps(value, ensure_ascii=False)


def call_from(obj: Any, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> ParsedCall:
    """A call from its JSON object: ``name`` plus ``arguments`` (or Llama's ``parameters``), an object or text."""
    if not isinstance(obj, dict):
        raise NotACall("a call is a JSON object")
    if isinstance(obj.get("function"), dict):  # {"type": "function", "function": {...}}, as some models echo
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise NotACall("a call needs a name")
    key = next((k for k in args_keys if k in obj), None)
    return ParsedCall(name, _arguments(obj[key]) if key else "{}")


_DECODER = json.JSONDecoder()


def decode_json(buf: str, final: bool) -> tuple[Any, int] | None:
    """The JSON value at the start of ``buf`` (after whitespace) and where it ends; None while it may still be
    incomplete; ``NotACall`` when it cannot become JSON."""
    start = len(buf) - len(buf.lstrip())
    if start == len(buf):
        if final:
            raise NotACall("no JSON")
        return None
    try:
        value, end = _DECODER.raw_decode(buf, start)
        return value, end
    except json.JSONDecodeError as e:
        incomplete = e.msg.startswith("Unterminated string") or e.pos >= len(buf.rstrip())
        if incomplete and not final:
            return None
        raise NotACall(e.msg) from None
    except RecursionError:  # nesting deeper than the decoder goes: not a call, and never an error to the client
        raise NotACall("JSON nested too deeply") from None


_SEPARATORS = re.compile(r"[\s;,]*")


def _after_calls(rest: str) -> str:
    # Between and after parallel calls models put newlines, ';' (Llama 3.x) or ','.
    return rest[_SEPARATORS.match(rest).end():]  # type: ignore[union-attr]


def _hermes(buf: str, final: bool) -> tuple[list[ParsedCall], str] | None:
    close = buf.find("</tool_call>")
    if close < 0 and not final:
        return None
    body = buf if close < 0 else buf[:close]
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        raise NotACall("the body of <tool_call> is not JSON") from None
    rest = "" if close < 0 else buf[close + len("</tool_call>"):]
    return [call_from(obj)], _after_calls(rest)


_CALL_START = re.compile(r'\{\s*"name"\s*:')
_NAME_KEY = '"name"'


def _opens_call(buf: str, final: bool) -> bool | None:
    """Whether ``buf`` (at a '{') starts a call object, whitespace allowed as JSON allows it: ``{ "name" :``
    is what a grammar may well produce. None: not decided yet."""
    if _CALL_START.match(buf):
        return True
    rest = buf[1:].lstrip()
    if final or len(rest) >= len(_NAME_KEY) or not _NAME_KEY.startswith(rest):
        if rest.startswith(_NAME_KEY) and not final and not rest[len(_NAME_KEY):].strip():
            return None  # '{"name"' then whitespace so far: the ':' may still come
        return False
    return None


def _json_objects(buf: str, final: bool) -> tuple[list[ParsedCall], str] | None:
    head = buf.lstrip()  # after <|python_tag|> the object may follow a space
    if not head:
        if final:
            raise NotACall("no JSON")
        return None
    opens = _opens_call(head, final)
    if opens is None:
        return None
    if not opens:
        raise NotACall("not a call object")
    got = decode_json(buf, final)
    if got is None:
        return None
    obj, end = got
    return [call_from(obj)], _after_calls(buf[end:])


def _json_list(buf: str, final: bool) -> tuple[list[ParsedCall], str] | None:
    got = decode_json(buf, final)
    if got is None:
        return None
    value, end = got
    items = value if isinstance(value, list) else [value]
    if not items:
        raise NotACall("an empty list of calls")
    return [call_from(v) for v in items], _after_calls(buf[end:])


@dataclass(frozen=True)
class _Rules:
    triggers: tuple[tuple[str, bool], ...]  # (text, kept: the text is part of the block's JSON)
    extract: Extract


_RULES: dict[Family, _Rules] = {
    Family.HERMES: _Rules((("<tool_call>", False),), _hermes),
    # <|python_tag|> is a control token the detokenizer may drop: the bare JSON object is a call too.
    Family.LLAMA3: _Rules((("<|python_tag|>", False), ("{", True)), _json_objects),
    # [TOOL_CALLS] is a control token in Mistral's vocabulary: a bare list of calls counts as well.
    Family.MISTRAL: _Rules((("[TOOL_CALLS]", False), ('[{"name"', True)), _json_list),
    Family.JSON: _Rules((("{", True), ("<tool_call>", False)), _json_objects),
}


class ToolCallParser:
    """Feed text, get settled pieces; ``finish()`` settles the rest (an unclosed block: a call if its JSON is
    whole, else content)."""

    def __init__(self, family: Family, tools: tuple[Tool, ...] = ()) -> None:
        if family is Family.XML:  # its values are typed by the tools' schemas: rules of this request's own
            self.rules = _Rules(*xml_rules(tools))
        else:
            self.rules = _RULES.get(family, _RULES[Family.JSON])
        self.buf = ""
        self.trigger: str | None = None  # the trigger of the block being read, None outside one
        self.after_call = False  # separators between parallel calls are dropped, even when they stream later

    def feed(self, text: str) -> list[Piece]:
        self.buf += text
        return self._scan(final=False)

    def finish(self) -> list[Piece]:
        out = self._scan(final=True)
        if self.buf:
            out.append(self.buf)
            self.buf = ""
        return out

    def _scan(self, final: bool) -> list[Piece]:
        out: list[Piece] = []
        while self.buf:
            if self.after_call:
                self.buf = _after_calls(self.buf)
                if not self.buf:
                    break
                self.after_call = False
            if self.trigger is None:
                if not self._enter(out, final):
                    break
                continue
            try:
                got = self.rules.extract(self.buf, final)
            except NotACall:
                # Give the trigger back as text and look for the next one after it.
                trig, self.trigger = self.trigger, None
                kept = dict(self.rules.triggers)[trig]
                head = trig if not kept else self.buf[:len(trig)]
                out.append(head)
                self.buf = self.buf[len(trig):] if kept else self.buf
                continue
            if got is None:
                break
            calls, self.buf = got
            self.trigger = None
            self.after_call = True
            out.extend(calls)
        return _merged(out)

    def _enter(self, out: list[Piece], final: bool) -> bool:
        """Move to the next trigger (content before it goes out); False when none is in the buffer yet."""
        hits = [(self.buf.find(t), t, kept) for t, kept in self.rules.triggers]
        hits = [h for h in hits if h[0] >= 0]
        if not hits:
            hold = 0 if final else _partial_suffix(self.buf, [t for t, _ in self.rules.triggers])
            out.append(self.buf[:len(self.buf) - hold])
            self.buf = self.buf[len(self.buf) - hold:]
            return False
        at, trig, kept = min(hits)
        out.append(self.buf[:at])
        self.buf = self.buf[at:] if kept else self.buf[at + len(trig):]
        self.trigger = trig
        return True


def _partial_suffix(text: str, markers: list[str]) -> int:
    """The length of the longest end of ``text`` that begins some marker (to hold back until it is decided)."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


def _merged(pieces: list[Piece]) -> list[Piece]:
    out: list[Piece] = []
    for p in pieces:
        if isinstance(p, str):
            if not p:
                continue
            if out and isinstance(out[-1], str):
                out[-1] += p
                continue
        out.append(p)
    return out


def parse_generic(text: str) -> list[Piece]:
    """llama-server's generic format, which the whole output follows under its grammar: ``{"tool_call": {...}}``,
    ``{"tool_calls": [...]}`` or ``{"response": "..."}``; anything else is content."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return [text] if text else []
    try:
        if isinstance(obj, dict) and "tool_calls" in obj and isinstance(obj["tool_calls"], list):
            return [call_from(c) for c in obj["tool_calls"]]
        if isinstance(obj, dict) and "tool_call" in obj:
            return [call_from(obj["tool_call"])]
    except NotACall:
        return [text]
    if isinstance(obj, dict) and isinstance(obj.get("response"), str):
        return [obj["response"]] if obj["response"] else []
    return [text]
