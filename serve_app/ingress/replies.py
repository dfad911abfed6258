"""One error translator per transport, each from a ``ServeError``: an HTTP JSON reply (``error_response``), an SSE
error chunk (``sse_error``) and the bare value the handle API returns (``error_body``). Anything that is not a
``ServeError`` is a bug: it is logged here and the client gets an id to quote, never the exception text.

``Retry-After`` has its one rule here (``retry_after``): a refused request (429 queue full, 503 not ready, shutting
down, engine restarting) may come back after 1 s, since a slot or a replica frees up quickly; a ``/ready`` probe
answered 503 (``ready_response``: loading, failed, restarting, shutting down) after 2 s, since loading a model
takes seconds to minutes and a probe has nothing to gain from polling faster."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from serve_app.errors import ServeError

log = logging.getLogger("ray.serve")

DONE = "data: [DONE]\n\n"
REQUEST_RETRY_AFTER_S = 1
READY_RETRY_AFTER_S = 2
_RETRYABLE_STATUS = frozenset({429, 503})


def retry_after(status: int, *, probe: bool = False) -> dict[str, str]:
    """The ``Retry-After`` header for a reply with ``status`` (none unless 429/503); ``probe`` for ``/ready``."""
    if status not in _RETRYABLE_STATUS:
        return {}
    return {"Retry-After": str(READY_RETRY_AFTER_S if probe else REQUEST_RETRY_AFTER_S)}


def error_body(err: ServeError) -> dict[str, Any]:
    return {"error": err.to_dict()}


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_error(err: ServeError) -> str:
    return sse(error_body(err))


class _ErrorJSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        # ASCII-escaped: an error may quote client text, and no client text may break the reply.
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_response(err: ServeError, request_id: str | None = None) -> JSONResponse:
    headers = retry_after(err.status)
    if request_id:
        headers["X-Request-Id"] = request_id
    return _ErrorJSON(error_body(err), status_code=err.status, headers=headers)


def ready_response(body: dict[str, Any]) -> JSONResponse:
    """``/ready``'s reply: 200 when ``body["status"]`` is ``ready``, else 503 with the probe's ``Retry-After``."""
    status = 200 if body.get("status") == "ready" else 503
    return JSONResponse(body, status_code=status, headers=retry_after(status, probe=True))


def internal_error(exc: BaseException, request_id: str) -> ServeError:
    """A bug, logged with its traceback; the client's error names only the request id."""
    log.error("request %s failed: %s: %s", request_id, type(exc).__name__, exc, exc_info=exc)
    return ServeError(f"internal error (request id {request_id})")


class ClosableStream(Protocol):
    """What a streamed reply iterates: SSE strings, and ``close()`` to stop the generation behind them."""

    def __aiter__(self) -> AsyncIterator[str]: ...

    def close(self) -> None: ...


class SSEResponse(StreamingResponse):
    """An SSE reply that always closes its stream: also when the client left before the first chunk was sent,
    when an unstarted generator's ``finally`` would never run."""

    def __init__(self, stream: ClosableStream, headers: dict[str, str] | None = None) -> None:
        super().__init__(stream, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.close()

