"""The grammars that make a tool call parse: ``required`` and a named function are enforced from the first
token, ``auto`` lazily from the family's trigger text; for a model that thinks first, a grammar applies after
``</think>``. Only ``GrammarSpec`` values are built here; the engine compiles them.
"""

from __future__ import annotations

from typing import Any

from serve_app.protocol import GrammarSpec, Tool

from .formats import Family
from .reasoning import CLOSE
from .xmlgrammar import xml_grammar

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def call_schema(tool: Tool, args_key: str = "arguments") -> dict[str, Any]:
    """One call of ``tool``: its name, and arguments that match the function's parameters schema."""
    params = tool.function.parameters or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": tool.function.name}, args_key: params},
            "required": ["name", args_key], "additionalProperties": False}


def _any_call(tools: tuple[Tool, ...], args_key: str = "arguments") -> dict[str, Any]:
    schemas = [call_schema(t, args_key) for t in tools]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def tool_grammar(family: Family, tools: tuple[Tool, ...], *, lazy: bool, parallel: bool) -> GrammarSpec:
    """The calls' grammar for ``tools`` (already narrowed to the named one): forced, or ``lazy`` for ``auto``."""
    if family is Family.XML:
        return xml_grammar(tools, lazy=lazy, parallel=parallel)
    if family is Family.HERMES:
        return GrammarSpec(json_schema=_any_call(tools), prefix="<tool_call>\n", suffix="\n</tool_call>",
                           repeat=parallel, triggers=("<tool_call>",) if lazy else ())
    if family is Family.MISTRAL:
        items: dict[str, Any] = {"type": "array", "items": _any_call(tools), "minItems": 1}
        if not parallel:
            items["maxItems"] = 1
        return GrammarSpec(json_schema=items, prefix="[TOOL_CALLS]", triggers=("[TOOL_CALLS]",) if lazy else ())
    if family in (Family.LLAMA3, Family.JSON):
        key = "parameters" if family is Family.LLAMA3 else "arguments"
        # The trigger is the start of the call's JSON itself: the grammar applies from it on.
        return GrammarSpec(json_schema=_any_call(tools, key), repeat=parallel,
                           triggers=('{"name"',) if lazy else ())
    return GrammarSpec(json_schema=generic_schema(tools, forced=not lazy, parallel=parallel))


def generic_schema(tools: tuple[Tool, ...], *, forced: bool, parallel: bool) -> dict[str, Any]:
    """llama-server's generic format: the whole answer is one JSON object, a call (or calls) or a response."""
    call = _any_call(tools)
    calls: dict[str, Any] = (
        {"type": "object", "properties": {"tool_calls": {"type": "array", "items": call, "minItems": 1}},
         "required": ["tool_calls"], "additionalProperties": False} if parallel else
        {"type": "object", "properties": {"tool_call": call}, "required": ["tool_call"],
         "additionalProperties": False})
    if forced:
        return calls
    answer = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
              "additionalProperties": False}
    return {"anyOf": [calls, answer]}


def after_thinking(spec: GrammarSpec) -> GrammarSpec:
    """``spec`` for a model that is thinking: free text until ``</think>``, then the constraint (``</think>`` once,
    then the blocks, repeated for parallel calls). A lazy spec already lets the thinking through (it starts at its
    own trigger)."""
    if spec.triggers:
        return spec
    return spec.model_copy(update={"triggers": (CLOSE,), "lead": CLOSE + "\n\n" + spec.lead})
