"""The HTTP transport: a Starlette app over ``OpenAIService``. Route handlers are a few lines; auth and body limits
are pure ASGI middleware; every error leaves through one translator as an OpenAI-style JSON body."""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.errors import (
    AuthenticationError,
    InvalidRequestError,
    RequestTooLargeError,
    ServeError,
    ShuttingDownError,
)

from .openai import OpenAIService

log = logging.getLogger("ray.serve")

OPEN_PATHS = frozenset({"/health", "/ready", "/v1/health", "/"})


def route_path(scope: Scope) -> str:
    """The path below the application's route prefix (Ray Serve sets it as ``root_path``)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def error_response(err: ServeError, request_id: str | None = None) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status in (429, 503) else {}
    if request_id:
        headers["X-Request-Id"] = request_id
    return JSONResponse({"error": err.to_dict()}, status_code=err.status, headers=headers)


def internal_error(exc: BaseException, request_id: str) -> JSONResponse:
    # The client gets an id to quote, never the exception text: it may hold paths or internals.
    log.error("request %s failed: %s: %s", request_id, type(exc).__name__, exc, exc_info=exc)
    err = ServeError(f"internal error (request id {request_id})")
    return error_response(err, request_id)


class GuardMiddleware:
    """API-key auth (constant-time compare) and a body-size limit, before any route runs."""

    def __init__(self, app: ASGIApp, api_keys: list[str], max_body_bytes: int) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys if k]
        self.max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self.keys and route_path(scope) not in OPEN_PATHS and not self._authorised(headers):
            await error_response(AuthenticationError("missing or invalid API key (Authorization: Bearer ...)"))(
                scope, receive, send)
            return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await error_response(RequestTooLargeError(f"the request body is over {self.max_body} bytes"))(
                scope, receive, send)
            return
        await self.app(scope, receive, send)

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


async def _json_body(request: Request, limit: int) -> Any:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestTooLargeError(f"the request body is over {limit} bytes")
    try:
        return json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequestError("the request body is not valid JSON") from None


Handler = Callable[[Request], Awaitable[Response]]


Observer = Callable[[str, int, float], None]


def build_asgi_app(service: OpenAIService, *, api_keys: list[str], max_body_bytes: int,
                   is_shutting_down: Callable[[], bool] = lambda: False,
                   observe: Observer | None = None) -> ASGIApp:
    def guarded(fn: Callable[[Request, str], Awaitable[Response]], route: str) -> Handler:
        async def handler(request: Request) -> Response:
            rid = request.headers.get("x-request-id") or uuid.uuid4().hex
            t0 = time.perf_counter()
            try:
                if is_shutting_down() and route_path(request.scope) not in OPEN_PATHS:
                    raise ShuttingDownError("the server is shutting down; retry shortly")
                resp = await fn(request, rid)
            except ServeError as e:
                resp = error_response(e, rid)
            except Exception as e:  # never a traceback to the client
                resp = internal_error(e, rid)
            if observe is not None:
                observe(route, resp.status_code, (time.perf_counter() - t0) * 1e3)
            return resp
        return handler

    def reply(out: dict[str, Any] | AsyncIterator[str]) -> Response:
        if isinstance(out, dict):
            return JSONResponse(out)
        return StreamingResponse(out, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def chat(request: Request, rid: str) -> Response:
        return reply(await service.chat(await _json_body(request, max_body_bytes), f"chatcmpl-{rid}"))

    async def completions(request: Request, rid: str) -> Response:
        return reply(await service.completions(await _json_body(request, max_body_bytes), f"cmpl-{rid}"))

    async def tokenize(request: Request, rid: str) -> Response:
        return JSONResponse(await service.tokenize(await _json_body(request, max_body_bytes)))

    async def detokenize(request: Request, rid: str) -> Response:
        return JSONResponse(await service.detokenize(await _json_body(request, max_body_bytes)))

    async def models(request: Request, rid: str) -> Response:
        return JSONResponse(await service.models())

    async def health(request: Request, rid: str) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request, rid: str) -> Response:
        try:
            info = await service.info()
        except ServeError as e:  # LlamaModel has no live replica right now (restarting after a crash)
            return JSONResponse({"status": "unavailable", "reason": e.message}, status_code=503,
                                headers={"Retry-After": "2"})
        state = info.state
        body: dict[str, Any] = {"status": state, "model": info.model}
        if state == "failed":
            body["reason"] = info.reason
        if state == "ready" and is_shutting_down():
            body["status"] = "shutting_down"
        return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503,
                            headers={} if state == "ready" else {"Retry-After": "2"})

    async def stats(request: Request, rid: str) -> Response:
        return JSONResponse((await service.info()).model_dump())

    table: list[tuple[str, Callable[[Request, str], Awaitable[Response]], str]] = [
        ("/v1/chat/completions", chat, "POST"),
        ("/v1/completions", completions, "POST"),
        ("/v1/models", models, "GET"),
        ("/tokenize", tokenize, "POST"),
        ("/detokenize", detokenize, "POST"),
        ("/health", health, "GET"),
        ("/v1/health", health, "GET"),
        ("/ready", ready, "GET"),
        ("/stats", stats, "GET"),
    ]
    routes = [Route(path, guarded(fn, path), methods=[method]) for path, fn, method in table]

    async def not_found(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 404)
        msg = "method not allowed" if code == 405 else f"no route {request.method} {request.url.path}"
        return JSONResponse({"error": {"message": msg, "type": "invalid_request_error", "param": None,
                                       "code": "not_found" if code == 404 else "method_not_allowed"}},
                            status_code=code)

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    return GuardMiddleware(app, api_keys, max_body_bytes)
