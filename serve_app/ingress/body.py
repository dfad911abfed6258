"""A request body, from bytes to a JSON value, with its size and shape bounded before any model sees it.

The size limit holds while the body arrives (chunked bodies without a content-length too) and the chunks are
joined once, so reading stays linear in the body size. JSON that no OpenAI body needs is refused with a 400:
``NaN``/``Infinity`` (not JSON), nesting deeper than ``MAX_JSON_DEPTH``, and lone UTF-16 surrogates anywhere:
``"\\ud800"`` is valid JSON but not valid Unicode, and would fail later, when the text is encoded for the
tokenizer or the reply. Surrogates are refused rather than replaced so a client learns its text was broken.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from serve_app.errors import InvalidRequestError, RequestTooLargeError

# A chat body nests about 5 levels; tool and response_format JSON schemas add a few per nested object.
MAX_JSON_DEPTH = 64


async def read_body(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise RequestTooLargeError(f"the request body is over {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def parse_json(raw: bytes) -> Any:
    """The JSON value of a body (``None`` for an empty one), checked with ``check_json``."""
    if not raw.strip():
        return None
    try:
        value = json.loads(raw, parse_constant=_not_json)
    except RecursionError:  # the decoder's own depth guard, far above ours
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequestError("the request body is not valid JSON") from None
    check_json(value)
    return value


def check_json(value: Any) -> None:
    """Refuse nesting over ``MAX_JSON_DEPTH`` and lone surrogates in any string or key. Iterative, so a hostile
    value cannot exhaust the stack here either."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            _check_text(v)
        elif isinstance(v, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise _too_deep()
            if isinstance(v, dict):
                for k, x in v.items():
                    _check_text(k)
                    stack.append((x, depth + 1))
            else:
                stack.extend((x, depth + 1) for x in v)


def _check_text(s: str) -> None:
    if s.isascii():
        return
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError("the request body holds a lone UTF-16 surrogate (such as \\ud800), which is not "
                                  "valid Unicode text") from None


def _not_json(token: str) -> Any:
    raise InvalidRequestError(f"the request body is not valid JSON ({token} is not a JSON number)")


def _too_deep() -> InvalidRequestError:
    return InvalidRequestError(f"the request body is nested too deeply (over {MAX_JSON_DEPTH} levels)")
