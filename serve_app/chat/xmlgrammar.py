"""The GBNF of the XML tool-call family (llama-server's Qwen3-Coder grammar, in the shape ``xmlcalls`` reads):

    <tool_call>\\n<function=NAME>\\n(<parameter=P>\\nVALUE\\n</parameter>\\n)*</function>\\n</tool_call>

NAME is an offered function; its parameters are its schema's properties, each at most once and every required one
present, in any order for a few of them (see ``_arguments``). A VALUE whose type is only non-string types follows that
property's JSON schema (the same converter as ``response_format``); a string (or untyped, or string-or-other)
value is free text that cannot contain ``</parameter>``, narrowed to the literals of a string ``enum``/``const``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from serve_app.engine.gbnf import gbnf_literal, property_rules
from serve_app.errors import InvalidRequestError
from serve_app.protocol import GrammarSpec, Tool

from .xmlcalls import CLOSE_PARAM, OPEN_CALL, value_types

TEXT = "xml-text"
MAX_ANY_ORDER = 6  # parameters in any order up to this many (2^n rules): llama-server's bound too


def _char_class(chars: list[str], negate: bool) -> str:
    body = "".join("\\" + c if c in "]\\-[" else "\\x5E" if c == "^" else c for c in chars)
    return f"[{'^' if negate else ''}{body}]"


def excluding(word: str, name: str) -> str:
    """Rules, starting at ``name``, for any text in which ``word`` does not occur: the complement of the word's
    matching automaton, one rule per state, every state accepting and no rule for the step that would complete
    the word (llama-server's construction for its ``until`` grammars)."""
    # KMP failure links give the automaton's steps on a mismatch.
    fail = [0] * (len(word) + 1)
    k = 0
    for i in range(1, len(word)):
        while k and word[i] != word[k]:
            k = fail[k]
        k += word[i] == word[k]
        fail[i + 1] = k

    def step(q: int, c: str) -> int:
        while q and word[q] != c:
            q = fail[q]
        return q + 1 if word[q] == c else 0

    def state(q: int) -> str:
        return name if q == 0 else f"{name}-{q:02d}"

    alphabet = sorted(set(word))
    rules = []
    for q in range(len(word)):
        to: dict[int, list[str]] = {}
        for c in alphabet:
            to.setdefault(step(q, c), []).append(c)
        alts = [f"{_char_class(cs, False)} {state(d)}" for d, cs in sorted(to.items()) if 0 < d < len(word)]
        # Every other character (including those of the word that lead back to the start) restarts the match.
        alts.append(f"{_char_class([c for d, cs in to.items() if d for c in cs], True)} {state(0)}")
        rules.append(f"{state(q)} ::= | " + " | ".join(alts))
    return "\n".join(rules)


def _string_value(schema: Any) -> str:
    values = list(schema.get("enum") or []) if isinstance(schema, dict) else []
    if isinstance(schema, dict) and "const" in schema:
        values = [schema["const"]]
    if values and all(isinstance(v, str) and CLOSE_PARAM not in v for v in values):
        return "(" + " | ".join(gbnf_literal(v) for v in values) + ")"
    return TEXT


def _typed(schema: Any, root: Any) -> bool:
    types = value_types(schema, root)
    return bool(types) and "string" not in types


@lru_cache(maxsize=64)
def _body(tools_json: str) -> str:
    tools: list[dict[str, Any]] = json.loads(tools_json)
    objects = []
    for t in tools:
        props = t["parameters"].get("properties") or {}
        objects.append((t["parameters"], [p for p, s in props.items() if _typed(s, t["parameters"])]))
    rules_text, typed = property_rules(objects)
    calls, rules = [], []
    for i, t in enumerate(tools):
        props: dict[str, Any] = t["parameters"].get("properties") or {}
        listed = set(t["parameters"].get("required") or [])
        names = [p for p in props if p in listed] + [p for p in props if p not in listed]
        for j, p in enumerate(names):
            value = typed[i].get(p) or _string_value(props[p])
            rules.append(f"call{i}-arg{j} ::= {gbnf_literal(f'<parameter={p}>' + chr(10))} {value} "
                         f"{gbnf_literal(chr(10) + CLOSE_PARAM + chr(10))}")
        args, arg_rules = _arguments(f"call{i}", [p in listed for p in names])
        rules += arg_rules
        rules.append(f"call{i} ::= {gbnf_literal('<function=' + t['name'] + '>' + chr(10))} "
                     f"{args} {gbnf_literal('</function>' + chr(10))}")
        calls.append(f"call{i}")
    return "\n".join([f"root ::= {' | '.join(calls)}", *rules, excluding(CLOSE_PARAM, TEXT), rules_text])


def _arguments(call: str, required: list[bool]) -> tuple[str, list[str]]:
    """The parameters' sequence for ``call`` (its rules ``call-argJ``, required ones first) and the rules it needs.

    Up to ``MAX_ANY_ORDER`` parameters come in any order, each at most once, the required ones all present:
    models do not always keep the schema's order, and a forced order would bend what they meant (llama-server
    permutes the required ones). One rule per set of parameters still to write, so 2^n rules. Beyond that, the
    required ones in any order when they are few enough, then the optional ones in order."""
    n = len(required)
    if n <= MAX_ANY_ORDER:
        return _subsets(call, list(range(n)), required)
    must = [j for j in range(n) if required[j]]
    head, rules = _subsets(call, must, required) if len(must) <= MAX_ANY_ORDER else (
        " ".join(f"{call}-arg{j}" for j in must), [])
    tail = " ".join(f"{call}-arg{j}?" for j in range(n) if not required[j])
    return f"{head} {tail}".strip(), rules


def _subsets(call: str, items: list[int], required: list[bool]) -> tuple[str, list[str]]:
    if not items:
        return "", []
    rules = []
    for mask in range(1, 1 << len(items)):
        left = [j for k, j in enumerate(items) if mask >> k & 1]
        alts = [f"{call}-arg{j} {call}-left{mask & ~(1 << k)}".rstrip() if mask & ~(1 << k) else f"{call}-arg{j}"
                for k, j in enumerate(items) if mask >> k & 1]
        if not any(required[j] for j in left):
            alts.insert(0, "")  # only optional ones left: the call may end here
        rules.append(f"{call}-left{mask} ::= " + " | ".join(alts))
    return f"{call}-left{(1 << len(items)) - 1}", rules


def xml_grammar(tools: tuple[Tool, ...], *, lazy: bool, parallel: bool) -> GrammarSpec:
    """The calls' grammar for ``tools``: forced from the first token, or ``lazy`` from ``<tool_call>`` on."""
    plain = [{"name": t.function.name, "parameters": t.function.parameters or {"type": "object"}} for t in tools]
    try:
        body = _body(json.dumps(plain))  # the properties' order is the parameters' order
    except Exception as e:  # the converter is third-party code: whatever it raises, the schema cannot be used
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise InvalidRequestError(f"the tools' parameters cannot be enforced: {msg}", param="tools") from None
    return GrammarSpec(gbnf=body, prefix=OPEN_CALL + "\n", suffix="</tool_call>", repeat=parallel,
                       triggers=(OPEN_CALL,) if lazy else ())
