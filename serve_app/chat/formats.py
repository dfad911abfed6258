"""Which tool-call format a chat template speaks, found from its text, the way llama-server picks a parser.

A family fixes three things: how the template shows tools to the model (most templates take ``tools``; for one
that ignores them we add a system message), what the model writes to call one, and the trigger text at which a
lazy grammar starts. The family is a property of the template, so it is computed once per loaded model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from serve_app.protocol import Tool


class Family(StrEnum):
    XML = "xml"              # Qwen3-Coder, Qwen3.5, Nemotron Nano 3: <tool_call>\n<function=f>\n<parameter=p>\n...
    HERMES = "hermes"        # Hermes 2 Pro, Qwen2.5, Qwen3: <tool_call>\n{"name", "arguments"}\n</tool_call>
    LLAMA3 = "llama3"        # Llama 3.1-3.3: {"name", "parameters"} (after <|python_tag|> for built-in tools)
    MISTRAL = "mistral"      # Mistral / Mixtral v0.3+: [TOOL_CALLS][{"name", "arguments"}, ...]
    JSON = "json"            # a template that takes tools but matches no family: a bare {"name", "arguments"}
    GENERIC = "generic"      # a template that ignores tools: llama-server's generic {"tool_call": ...} JSON


@dataclass(frozen=True)
class ChatFormat:
    family: Family
    thinking: bool  # the template speaks <think>...</think> (DeepSeek-R1 distills, Qwen3, QwQ)
    system_role: bool = True  # the template renders a system message (Gemma's refuses one)

    @property
    def takes_tools(self) -> bool:
        return self.family is not Family.GENERIC


def detect(source: str) -> ChatFormat:
    """The format of a template, from markers its text contains (llama-server's ``common_chat_templates`` order:
    the most specific first)."""
    thinking = "<think>" in source or "</think>" in source
    if _xml_calls(source):
        family = Family.XML
    elif "<tool_call>" in source:
        family = Family.HERMES
    elif "[TOOL_CALLS]" in source:
        family = Family.MISTRAL
    elif "<|start_header_id|>" in source and ("ipython" in source or "<|python_tag|>" in source):
        family = Family.LLAMA3
    elif "tools" in source:
        family = Family.JSON
    else:
        family = Family.GENERIC
    return ChatFormat(family, thinking)


def _xml_calls(source: str) -> bool:
    # llama-server's Qwen3-Coder markers; a template that writes '<tool_call><function=' with no newline between
    # the tags speaks a different variant, which it leaves to other parsers (and so do we).
    return ("<tool_call>" in source and "<function=" in source and "<parameter=" in source
            and "'<tool_call><function=' ~ tool_call.name ~ '>'" not in source)


def tool_dicts(tools: tuple[Tool, ...]) -> list[dict[str, Any]]:
    """Tools as templates read them (OpenAI's shape, ``parameters`` always an object schema)."""
    out = []
    for t in tools:
        fn: dict[str, Any] = {"name": t.function.name, "parameters": t.function.parameters or
                              {"type": "object", "properties": {}}}
        if t.function.description is not None:
            fn["description"] = t.function.description
        out.append({"type": "function", "function": fn})
    return out


def generic_system_prompt(tools: list[dict[str, Any]], parallel: bool) -> str:
    """What a template that ignores ``tools`` is told instead (llama-server's generic format, in its words)."""
    shape = ('{"tool_calls": [{"name": "<tool name>", "arguments": {...}}, ...]}' if parallel else
             '{"tool_call": {"name": "<tool name>", "arguments": {...}}}')
    return ("You can call any of the following tools to satisfy the user's requests: "
            + json.dumps(tools, ensure_ascii=False)
            + "\n\nTo call a tool, respond with a JSON object of this shape: " + shape
            + '\nTo answer without a tool, respond with {"response": "<your answer>"}.')
