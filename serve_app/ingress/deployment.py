"""The ``Ingress`` deployment: the Starlette app for HTTP, plus handle methods for the RunPod worker that run the
same ``OpenAIService`` code path (the worker never speaks HTTP to us)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp

from serve_app.errors import InvalidRequestError, ServeError, ShuttingDownError
from serve_app.metrics import IngressMetrics

from .app import build_asgi_app
from .openai import OpenAIService, error_body

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models")


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024, graceful_shutdown_timeout_s=30)
@serve.ingress()
class Ingress:
    def __init__(self, model: DeploymentHandle, model_id: str, server: dict[str, Any], default_max_tokens: int) -> None:
        if server.get("low_latency", True):
            # By value over Ray Serve's replica-to-replica gRPC channel instead of through the object store: about
            # 1 ms less each way per request and per streamed item (measured; see README).
            model = model.options(_by_reference=False)
        self.service = OpenAIService(model, model_id, default_max_tokens)
        env_keys = [k.strip() for k in os.environ.get("GGUF_SERVE_API_KEYS", "").split(",") if k.strip()]
        self.api_keys = list(server.get("api_keys") or []) + env_keys
        self.max_body_bytes = int(server.get("max_body_bytes") or 4 * 1024 * 1024)
        self.metrics = IngressMetrics()
        self.draining = False

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return build_asgi_app(self.service, api_keys=self.api_keys, max_body_bytes=self.max_body_bytes,
                              observe=self.metrics.observe, is_shutting_down=lambda: self.draining)

    async def drain(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Graceful stop, step one: refuse new requests with 503 (and /ready says so, so balancers move away),
        let in-flight generations finish, return when the model is idle or ``timeout_s`` passed. Then delete the
        app (``python -m serve_app.drain`` does both)."""
        self.draining = True
        deadline = asyncio.get_running_loop().time() + timeout_s
        info = await self.service.info()
        while (info.slots_busy or info.waiting) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
            info = await self.service.info()
        return {"drained": not (info.slots_busy or info.waiting), "slots_busy": info.slots_busy,
                "waiting": info.waiting}

    # ---- handle API (RunPod worker) -------------------------------------------------------------------------

    async def ready(self) -> dict[str, Any]:
        return (await self.service.info()).model_dump()

    async def openai(self, route: str, body: dict[str, Any] | None, request_id: str | None = None) -> dict[str, Any]:
        """One OpenAI call, non-streaming; errors come back as ``{"error": {...}}`` values."""
        try:
            out = await self._dispatch(route, body, request_id, stream=False)
            assert isinstance(out, dict)
            return out
        except ServeError as e:
            return error_body(e)

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
        async for chunk in out:
            yield chunk

    async def _dispatch(self, route: str, body: dict[str, Any] | None, request_id: str | None,
                        stream: bool) -> dict[str, Any] | AsyncIterator[str]:
        if self.draining:
            raise ShuttingDownError("the server is shutting down; retry on another worker")
        if route == "/v1/models":
            return await self.service.models()
        body = dict(body or {})
        body["stream"] = stream
        if route == "/v1/chat/completions":
            return await self.service.chat(body, request_id)
        if route == "/v1/completions":
            return await self.service.completions(body, request_id)
        raise InvalidRequestError(f"unsupported openai_route '{route}'; supported: {', '.join(ROUTES)}",
                                  param="openai_route")
