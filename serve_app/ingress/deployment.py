"""The ``Ingress`` deployment: the Starlette app for HTTP, plus handle methods for the RunPod worker that run the
same ``OpenAIService`` code path (the worker never speaks HTTP to us)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp

from serve_app import ray_private
from serve_app.config import ServerConfig
from serve_app.errors import InvalidRequestError, ServeError, ShuttingDownError
from serve_app.metrics import IngressMetrics
from serve_app.replicas import Replicas
from serve_app.routes import BY_PATH, OPENAI_ROUTES
from serve_app.settings import Settings

from .app import build_asgi_app
from .exposure import warn_if_exposed
from .guard import acceptable_id
from .models import Kind, ModelTable, Served
from .openai import OpenAIService, Reply
from .replies import error_body
from .sse import EventStream


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(self, model: DeploymentHandle, model_id: str, server: ServerConfig, default_max_tokens: int,
                 others: list[tuple[str, Kind, DeploymentHandle]] | None = None, model_kind: Kind = "chat",
                 pooled: list[str] | None = None) -> None:
        # ``model`` is the default model; ``others`` the rest (name, kind, handle) when the app serves several;
        # ``pooled`` the names served on demand by one multiplexed deployment (their handles name the model).
        entries = [(model_id, model_kind, model), *(others or [])]
        if server.low_latency:
            # By value over Ray Serve's replica-to-replica gRPC channel instead of through the object store: about
            # 1 ms less each way per request and per streamed item (docs/benchmarks.md).
            entries = [(n, k, ray_private.by_value(h)) for n, k, h in entries]
        fanout: dict[str, Replicas] = {}  # one per deployment: a pool's replicas answer for all its models
        table = ModelTable([
            Served(n, k, h.options(multiplexed_model_id=n) if n in (pooled or ()) else h,
                   fanout.setdefault(h.deployment_name, Replicas(h.app_name, h.deployment_name)),
                   group=h.deployment_name if n in (pooled or ()) else n)
            for n, k, h in entries])
        self.service = OpenAIService(table.default.handle, model_id, default_max_tokens, table=table)
        self.api_keys = [*server.api_keys, *Settings().api_keys]
        self.max_body_bytes = server.max_body_bytes
        self.metrics = IngressMetrics()
        self.draining = False
        # In the background: asking Serve's controller must not hold up the replica's start.
        self._exposure_check = asyncio.get_running_loop().create_task(warn_if_exposed(len(self.api_keys)))

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return build_asgi_app(self.service, api_keys=self.api_keys, max_body_bytes=self.max_body_bytes,
                              observe=self.metrics.observe, is_shutting_down=lambda: self.draining)

    async def drain(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Graceful stop, step one: refuse new requests with 503 (and /ready says so, so balancers move away),
        let in-flight generations finish, return when every LlamaModel replica is idle or ``timeout_s`` passed.
        Then delete the app (``python -m serve_app.drain`` does both, on every Ingress replica)."""
        self.draining = True
        deadline = asyncio.get_running_loop().time() + timeout_s
        info, replicas = await self.service.overview()
        while (info.slots_busy or info.waiting) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
            info, replicas = await self.service.overview()
        return {"drained": not (info.slots_busy or info.waiting), "slots_busy": info.slots_busy,
                "waiting": info.waiting, "model_replicas": replicas}

    # ---- handle API (RunPod worker) -------------------------------------------------------------------------

    async def ready(self) -> dict[str, Any]:
        """Every LlamaModel replica together (slots summed: the RunPod worker's concurrency), and how many."""
        info, replicas = await self.service.overview()
        return {**info.model_dump(), "replicas": replicas}

    async def openai(self, route: str, body: dict[str, Any] | None, request_id: str | None = None) -> dict[str, Any]:
        """One OpenAI call, non-streaming; errors come back as ``{"error": {...}}`` values."""
        try:
            out = await self._dispatch(route, body, request_id, stream=False)
        except ServeError as e:
            return error_body(e)
        if isinstance(out, EventStream):  # not reached: stream=False was forced
            out.close()
            return error_body(ServeError("internal error: a stream where a response was expected"))
        return out

    async def openai_stream(self, route: str, body: dict[str, Any],
                            request_id: str | None = None) -> AsyncIterator[str | dict[str, Any]]:
        """The SSE strings of a streaming call (``data: ...\\n\\n`` ... ``data: [DONE]\\n\\n``), or one error dict."""
        try:
            out = await self._dispatch(route, body, request_id, stream=True)
        except ServeError as e:
            yield error_body(e)
            return
        if isinstance(out, dict):
            yield out
            return
        try:
            async for chunk in out:
                yield chunk
        finally:
            out.close()

    async def _dispatch(self, route: str, body: dict[str, Any] | None, request_id: str | None,
                        stream: bool) -> Reply:
        if self.draining:
            raise ShuttingDownError("the server is shutting down; retry on another worker")
        if route not in OPENAI_ROUTES:
            raise InvalidRequestError(f"unsupported openai_route '{route}'; supported: {', '.join(OPENAI_ROUTES)}",
                                      param="openai_route")
        entry = BY_PATH[route]
        if entry.id_prefix is None:
            out: dict[str, Any] = await getattr(self.service, entry.name)()
            return out
        if isinstance(body, dict) or body is None:  # anything else is refused by the service's own check
            body = {**(body or {}), "stream": stream}
        reply: Reply = await getattr(self.service, entry.name)(body, acceptable_id(request_id))
        return reply
