"""The HTTP transport: a Starlette app over ``OpenAIService``, its routes built from the one route table
(``serve_app.routes``). Each handler is a few lines; the guard (auth, draining, size) is ASGI middleware
(``guard``), bodies are read and checked in ``body``, and every error leaves through ``replies.error_response``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as StarletteRoute
from starlette.types import ASGIApp

from serve_app.errors import MethodNotAllowedError, NoRouteError, ServeError
from serve_app.routes import ROUTES, Route, response_id

from .body import parse_json, read_body
from .guard import GuardMiddleware, id_to_echo, request_id
from .node_metrics import PROMETHEUS_TEXT, scrape_node_metrics
from .openai import OpenAIService, Reply
from .ping import ping_status
from .replies import SSEResponse, error_response, internal_error, ready_response
from .sse import EventStream

Observer = Callable[[str, int, float], None]


INLINE_PARSE_BYTES = 64 * 1024  # below this, parsing inline costs less than the thread hop


@dataclass(frozen=True)
class Ctx:
    """What every handler needs: the service, the body limit and whether the server is draining."""

    service: OpenAIService
    max_body_bytes: int
    is_shutting_down: Callable[[], bool]
    scrape_metrics: Callable[[], Awaitable[bytes]] = scrape_node_metrics

    async def json(self, request: Request) -> Any:
        raw = await read_body(request.stream(), self.max_body_bytes)
        if len(raw) < INLINE_PARSE_BYTES:
            return parse_json(raw)
        # Parsing and walking a large body takes tens of ms of CPU: on a worker thread the event loop (which
        # relays every other client's stream) gets the GIL back every switch interval instead of waiting it out.
        return await asyncio.to_thread(parse_json, raw)


Handler = Callable[[Ctx, Request, Route, str], Awaitable[Response]]


def reply(out: Reply, request: Request) -> Response:
    echo = id_to_echo(request.scope)
    headers = {"X-Request-Id": echo} if echo else None
    if isinstance(out, EventStream):
        return SSEResponse(out, headers=headers)
    return JSONResponse(out, headers=headers)


# ---- handlers: one per kind of route; ``route.name`` names the service method ----------------------------------


async def generate(ctx: Ctx, request: Request, route: Route, rid: str) -> Response:
    method = getattr(ctx.service, route.name)
    return reply(await method(await ctx.json(request), response_id(route.path, rid)), request)


async def convert(ctx: Ctx, request: Request, route: Route, rid: str) -> Response:
    return reply(await getattr(ctx.service, route.name)(await ctx.json(request)), request)


async def models(ctx: Ctx, request: Request, route: Route, rid: str) -> Response:
    return reply(await ctx.service.models(), request)


async def stats(ctx: Ctx, request: Request, route: Route, rid: str) -> Response:
    return reply(await ctx.service.stats(), request)


async def health(ctx: Ctx, request: Request, route: Route, rid: str) -> Response:
    return JSONResponse({"status": "ok"})


async def ready_body(ctx: Ctx) -> dict[str, Any]:
    try:
        info = await ctx.service.info()
    except ServeError as e:  # LlamaModel has no live replica right now (restarting after a crash)
        return {"status": "unavailable", "reason": e.message}
    body: dict[str, Any] = {"status": info.state, "model": info.model}
    if info.state == "failed":
        body["reason"] = info.reason
    if info.state == "ready" and ctx.is_shutting_down():
        body["status"] = "shutting_down"
    return body


async def ready(ctx: Ctx, request: Request, route: Route, rid: str) -> Response:
    return ready_response(await ready_body(ctx))


async def ping(ctx: Ctx, request: Request, route: Route, rid: str) -> Response:
    body = await ready_body(ctx)
    status = ping_status(body["status"])
    return Response(status_code=204) if status == 204 else JSONResponse(body, status_code=status)


async def metrics(ctx: Ctx, request: Request, route: Route, rid: str) -> Response:
    return Response(await ctx.scrape_metrics(), media_type=PROMETHEUS_TEXT)


HANDLERS: dict[str, Handler] = {
    "chat": generate, "completions": generate, "embeddings": generate, "tokenize": convert, "detokenize": convert,
    "models": models, "stats": stats, "health": health, "ready": ready, "ping": ping, "metrics": metrics,
}


# ---- assembly ---------------------------------------------------------------------------------------------------


def endpoint(ctx: Ctx, route: Route, observe: Observer | None) -> Callable[[Request], Awaitable[Response]]:
    """The handler of ``route`` with the one translation of errors (typed ones as themselves, bugs as an
    internal error naming the request id) and the route's latency metric."""
    handler = HANDLERS[route.name]

    async def handle(request: Request) -> Response:
        rid = request_id(request.scope)
        t0 = time.perf_counter()
        try:
            resp = await handler(ctx, request, route, rid)
        except ServeError as e:
            resp = error_response(e, id_to_echo(request.scope))
        except Exception as e:  # never a traceback to the client
            resp = error_response(internal_error(e, rid), id_to_echo(request.scope))
        if observe is not None:
            observe(route.path, resp.status_code, (time.perf_counter() - t0) * 1e3)
        return resp

    return handle


async def no_route(request: Request, exc: Exception) -> Response:
    if getattr(exc, "status_code", 404) == 405:
        err: ServeError = MethodNotAllowedError("method not allowed")
    else:
        err = NoRouteError(f"no route {request.method} {request.url.path}")
    return error_response(err, id_to_echo(request.scope))


def build_asgi_app(service: OpenAIService, *, api_keys: list[str], max_body_bytes: int,
                   is_shutting_down: Callable[[], bool] = lambda: False,
                   observe: Observer | None = None,
                   scrape_metrics: Callable[[], Awaitable[bytes]] = scrape_node_metrics) -> ASGIApp:
    ctx = Ctx(service, max_body_bytes, is_shutting_down, scrape_metrics)
    routes = [StarletteRoute(r.path, endpoint(ctx, r, observe), methods=[r.method]) for r in ROUTES]
    app = Starlette(routes=routes, exception_handlers={404: no_route, 405: no_route})
    return GuardMiddleware(app, api_keys, max_body_bytes, is_shutting_down)
