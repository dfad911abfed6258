"""A chat generation's text as typed events: reasoning, content and tool calls, streamed or gathered.

``ChatOutput`` sits between the engine's ``Delta``s and the transport: each text delta becomes a ``Delta`` whose
``text`` is answer content, ``reasoning`` thinking, and ``tool_calls`` call pieces in OpenAI's streaming order (the
first piece of a call carries its id and name with empty arguments, the next its arguments). Calls are sent once
their JSON is complete, so a client never sees a call that later turns out not to be one.
"""

from __future__ import annotations

import dataclasses
import secrets
import string

from serve_app.protocol import Delta, Done, FunctionCall, Tool, ToolCall, ToolCallDelta

from .formats import Family
from .reasoning import ThinkSplitter
from .toolparse import ParsedCall, Piece, ToolCallParser, parse_generic

_ALNUM = string.ascii_letters + string.digits


def new_call_id(family: Family) -> str:
    # Mistral's template refuses history whose call ids are not 9 alphanumerics; others take OpenAI's shape.
    if family is Family.MISTRAL:
        return "".join(secrets.choice(_ALNUM) for _ in range(9))
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


class ChatOutput:
    def __init__(self, family: Family, *, tools: bool, think: ThinkSplitter | None,
                 offered: tuple[Tool, ...] = ()) -> None:
        self.family = family
        self.think = think
        # ``offered``: the request's tools, which type the XML family's parameter values
        self.tools = ToolCallParser(family, offered) if tools and family is not Family.GENERIC else None
        self.generic = tools and family is Family.GENERIC
        self._generic_buf: list[str] = []
        self.n_calls = 0

    def delta(self, ev: Delta) -> Delta:
        """``ev`` with its text split into content, reasoning and call pieces (other fields kept)."""
        reasoning, content = self.think.feed(ev.text) if self.think else ("", ev.text)
        return self._build(ev, reasoning, self._content(content, final=False))

    def final(self) -> Delta | None:
        """What the parsers still held, as one last delta (None when nothing)."""
        reasoning, content = self.think.finish() if self.think else ("", "")
        pieces = self._content(content, final=True)
        out = self._build(Delta("", 0), reasoning, pieces)
        return out if out.text or out.reasoning or out.tool_calls else None

    def done(self, ev: Done) -> Done:
        """``ev`` with ``finish_reason`` "tool_calls" when the model called a tool and was not cut off."""
        if self.n_calls and ev.finish_reason != "length":
            return dataclasses.replace(ev, finish_reason="tool_calls")
        return ev

    def _content(self, text: str, final: bool) -> list[Piece]:
        if self.generic:
            self._generic_buf.append(text)
            return parse_generic("".join(self._generic_buf)) if final else []
        if self.tools is None:
            return [text] if text else []
        pieces = self.tools.feed(text) if text else []
        return pieces + self.tools.finish() if final else pieces

    def _build(self, ev: Delta, reasoning: str, pieces: list[Piece]) -> Delta:
        text: list[str] = []
        calls: list[ToolCallDelta] = []
        for p in pieces:
            if isinstance(p, ParsedCall):
                calls += self._call_deltas(p)
            elif not calls:
                text.append(p)
            elif p.strip():  # text after a call in the same delta: rare; kept, after the call
                text.append(p)
        return dataclasses.replace(ev, text="".join(text), reasoning=reasoning, tool_calls=calls or None)

    def _call_deltas(self, call: ParsedCall) -> list[ToolCallDelta]:
        i = self.n_calls
        self.n_calls += 1
        return [ToolCallDelta(i, "", id=new_call_id(self.family), name=call.name), ToolCallDelta(i, call.arguments)]


def gather_calls(deltas: list[ToolCallDelta]) -> list[ToolCall]:
    """The whole calls from their streamed pieces (for a non-streamed reply)."""
    by_index: dict[int, dict[str, str]] = {}
    for d in deltas:
        c = by_index.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
        c["id"] = d.id or c["id"]
        c["name"] = d.name or c["name"]
        c["arguments"] += d.arguments
    return [ToolCall(id=c["id"], function=FunctionCall(name=c["name"], arguments=c["arguments"]))
            for _, c in sorted(by_index.items())]
