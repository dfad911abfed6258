"""A request body, from bytes to a JSON value, with its size and shape bounded before any model sees it.

The size limit holds while the body arrives (chunked bodies without a content-length too) and the chunks are
joined once, so reading stays linear in the body size. The parsed value then goes through the one JSON sanity
walk (``serve_app.jsonsafe``: depth, lone surrogates, NaN/Infinity); this is the only place an HTTP body is
walked. ``NaN``/``Infinity`` literals are refused by the parser already, as not JSON.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from serve_app.errors import InvalidRequestError, RequestTooLargeError
from serve_app.jsonsafe import check_json, too_deep

ROOT = "body"  # how the walk names the body itself in an error


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
    """The JSON value of a body (``None`` for an empty one), checked with ``jsonsafe.check_json``."""
    if not raw.strip():
        return None
    try:
        value = json.loads(raw, parse_constant=_not_json)
    except RecursionError:  # the decoder's own depth guard, far above ours
        raise too_deep(ROOT) from None
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequestError("the request body is not valid JSON") from None
    check_json(value, root=ROOT)
    return value


def _not_json(token: str) -> Any:
    raise InvalidRequestError(f"the request body is not valid JSON ({token} is not a JSON number)")

