"""Errors as values across the Ray boundary (used by ``deployment.py`` and its callers; no Ray import here).

``ModelCache`` methods return ``{"error": err.to_dict()}`` instead of raising: a plain dict survives any
serializer and Ray version unchanged, whereas a raised exception arrives wrapped in ``RayTaskError``. The
caller turns it back into the typed error with ``unwrap``.
"""

from __future__ import annotations

from typing import Any, TypeVar

from serve_app.errors import ServeError, error_from_dict

T = TypeVar("T")


def error_reply(err: BaseException) -> dict[str, Any]:
    if not isinstance(err, ServeError):
        err = ServeError(f"model cache internal error: {type(err).__name__}: {err}")
    return {"error": err.to_dict()}


def is_error(reply: object) -> bool:
    return isinstance(reply, dict) and set(reply) == {"error"} and isinstance(reply["error"], dict)


def unwrap(reply: T) -> T:
    """``reply`` itself, or raise the typed ``ServeError`` it carries."""
    if is_error(reply):
        assert isinstance(reply, dict)
        raise error_from_dict(reply["error"])
    return reply
