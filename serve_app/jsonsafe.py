"""The one sanity walk over a client's JSON value, run once by each transport before anything else reads it
(HTTP: ``ingress/body.parse_json``; RunPod: ``runpod/input.normalise``). Pure: stdlib and ``serve_app.errors``.

It refuses what no OpenAI body needs and what would fail later, deep inside a model call:

* nesting deeper than ``MAX_DEPTH`` (Ray pickles a body recursively and pydantic validates it recursively);
* a lone UTF-16 surrogate in any string or key: JSON's ``"\\ud800"`` escape decodes to one, which is not valid
  Unicode and fails when the text is encoded for the tokenizer or the reply. Refused, not replaced, so a client
  learns its text was broken;
* NaN and +-Infinity, which Python's JSON parsers accept and JSON does not;
* optionally, more than ``max_bytes`` of compact JSON (strings counted without escapes), for a value that arrived
  already parsed (a RunPod job); the walk stops at the first problem, so a huge value costs at most that much.

The walk is iterative, so no value can exhaust the stack here. Each error names where it is (``param``).
"""

from __future__ import annotations

import math
from typing import Any

from serve_app.errors import InvalidRequestError, RequestTooLargeError

# A chat body nests about 5 levels; tool and response_format JSON schemas add a few per nested object. Far
# shallower than what breaks pickling or pydantic (~950 levels fail there).
MAX_DEPTH = 64


def show(text: str, limit: int = 40) -> str:
    """Client text as it may appear in a message: lone surrogates escaped, long text cut."""
    out = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return out if len(out) <= limit else out[: limit - 3] + "..."


def too_deep(where: str) -> InvalidRequestError:
    return InvalidRequestError(f"{where}: nested too deeply; values nested more than {MAX_DEPTH} levels are refused",
                               param=where)


def check_json(value: Any, *, root: str, max_bytes: int | None = None) -> None:
    """Raise ``InvalidRequestError`` (or ``RequestTooLargeError`` over ``max_bytes``) for the first problem in
    ``value``; ``root`` names the value itself in messages (``body``, ``input``), paths below it are dotted."""
    total = 0
    stack: list[tuple[str, Any, int]] = [("", value, 0)]
    while stack:
        path, v, depth = stack.pop()
        where = path or root
        if isinstance(v, dict | list):
            if depth >= MAX_DEPTH:
                raise too_deep(where)
            total += 2 + len(v)  # brackets and separators
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for key, item in items:
                if max_bytes is not None and total > max_bytes:
                    break
                sub = f"{path}.{show(str(key))}" if path else show(str(key))
                if isinstance(key, str):
                    total += _text_size(key, sub) + 3
                stack.append((sub, item, depth + 1))
        elif isinstance(v, str):
            total += _text_size(v, where) + 2
        else:
            total += _scalar_size(v, where)
        if max_bytes is not None and total > max_bytes:
            raise RequestTooLargeError(f"{root}: over {max_bytes} bytes of JSON", param=root)


def _text_size(text: str, where: str) -> int:
    """The UTF-8 size of ``text``; ``InvalidRequestError`` if it holds a lone surrogate."""
    if text.isascii():
        return len(text)
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidRequestError(f"{where}: contains a lone UTF-16 surrogate (such as \\ud800), which is not "
                                  "valid Unicode text", param=where) from None


def _scalar_size(value: Any, where: str) -> int:
    if isinstance(value, float):
        if not math.isfinite(value):
            literal = "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
            raise InvalidRequestError(f"{where}: {literal} is not a JSON number", param=where)
        return len(repr(value))
    if isinstance(value, bool) or value is None:
        return 5
    if isinstance(value, int):
        return value.bit_length() * 10 // 33 + 2  # decimal digits, without str() (limited to 4300 digits)
    return 8
