"""Cross-cutting HTTP concerns as pure ASGI middleware, before any route runs: the request id, API-key auth
(constant-time compare), refusing new work while draining, and the declared body size.

``X-Request-Id`` is client input that we echo in response ids and headers, so it is used only when it is a short
plain token (``request_id``); anything else gets a fresh id. Serve's HTTP proxy echoes the header the request
carried on every reply by itself (and gives one to requests without it), so we add ours only when it differs.
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.errors import AuthenticationError, RequestTooLargeError, ServeError, ShuttingDownError
from serve_app.routes import OPEN_PATHS

from .replies import error_response

ACCEPTABLE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_SCOPE_KEY = "gguf_serve.request_id"


def acceptable_id(given: str | None) -> str | None:
    """``given`` when it is safe to echo (1-128 of ``A-Z a-z 0-9 . _ : -``), else None."""
    return given if given and ACCEPTABLE_ID.fullmatch(given) else None


def _carried(scope: Scope) -> str:
    return next((v for k, v in scope.get("headers", []) if k.lower() == b"x-request-id"), b"").decode("latin-1")


def request_id(scope: Scope) -> str:
    """This request's id: the ``X-Request-Id`` it carried when acceptable, else a fresh one; fixed per request."""
    rid: str | None = scope.get(_SCOPE_KEY)
    if rid is None:
        rid = acceptable_id(_carried(scope)) or uuid.uuid4().hex
        scope[_SCOPE_KEY] = rid
    return rid


def id_to_echo(scope: Scope) -> str | None:
    """The request id for our ``X-Request-Id`` reply header: only one the request did not carry itself."""
    rid = request_id(scope)
    return None if rid == _carried(scope) else rid


def route_path(scope: Scope) -> str:
    """The path below the application's route prefix (Ray Serve sets it as ``root_path``)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


class GuardMiddleware:
    def __init__(self, app: ASGIApp, api_keys: list[str], max_body_bytes: int,
                 is_shutting_down: Callable[[], bool]) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys if k]
        self.max_body = max_body_bytes
        self.is_shutting_down = is_shutting_down

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await error_response(refusal, id_to_echo(scope))(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> ServeError | None:
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        open_path = route_path(scope) in OPEN_PATHS
        if self.keys and not open_path and not self._authorised(headers):
            return AuthenticationError("missing or invalid API key (Authorization: Bearer ...)")
        if not open_path and self.is_shutting_down():
            return ShuttingDownError("the server is shutting down; retry shortly")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return RequestTooLargeError(f"the request body is over {self.max_body} bytes")
        return None

    def _authorised(self, headers: dict[str, bytes]) -> bool:
        auth = headers.get("authorization", b"")
        if not auth.lower().startswith(b"bearer "):
            return False
        given = auth[7:].strip()
        # Compare against every key, without early exit, so timing says nothing about which key nearly matched.
        ok = False
        for k in self.keys:
            ok |= secrets.compare_digest(given, k)
        return ok
