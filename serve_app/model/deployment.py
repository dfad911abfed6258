"""The ``LlamaModel`` deployment: a thin Ray Serve shell around ``ModelService``.

Its options (resources, request limits, health checks) are set in one place, ``serve_app.builder``. The
constructor returns at once and loading runs in the background, so the ingress can answer "loading" on its
readiness route while weights are read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import AppArgs
from serve_app.engine import RequestStream
from serve_app.errors import ServeError
from serve_app.metrics import ModelMetrics
from serve_app.protocol import (
    DetokenizeCall,
    Done,
    ErrorEvent,
    Event,
    GenerateRequest,
    ModelInfo,
    Text,
    TokenizeCall,
    Tokens,
)

from .loading import cache_fetch
from .service import ModelService, stamp_replica


@serve.deployment
class LlamaModel:
    def __init__(self, cache: DeploymentHandle, args: dict[str, Any], use_gpu: bool) -> None:
        self.cache = cache
        # Ray runs the constructor on the replica's event loop, so loading starts on that loop.
        self.service = ModelService(AppArgs.model_validate(args), cache_fetch(cache), use_gpu, metrics=ModelMetrics())
        self.service.start()
        self.replica = serve.get_replica_context().replica_id.unique_id

    # ---- Ray Serve hooks -----------------------------------------------------------------------------------

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``batching`` from the config, live (a ``user_config`` change does not restart the replica)."""
        if "max_batch_size" in user_config:
            self._admit.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            wait = float(user_config["batch_wait_timeout_s"])
            self._admit.set_batch_wait_timeout_s(wait)
            # With no window to wait for, the Ray batch hop adds only latency (about 2.7 ms of queue time on a
            # 2-core CPU): the engine already admits everything that arrived during a step together.
            self.service.batched_admit = self._admit if wait > 0 else None

    def check_health(self) -> None:
        problem = self.service.health_problem()
        if problem is not None:
            raise RuntimeError(problem)

    def __del__(self) -> None:
        # Ray calls this after draining in-flight requests (graceful_shutdown_timeout_s bounds the wait).
        if getattr(self, "service", None) is not None:
            self.service.close()

    # ---- API used by the ingress ---------------------------------------------------------------------------

    async def info(self) -> ModelInfo:
        return await self.service.info()

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Event]:
        async for ev in self.service.generate(req):
            yield stamp_replica(ev, self.replica)

    async def complete(self, req: GenerateRequest) -> Done | ErrorEvent:
        result: Done | ErrorEvent = stamp_replica(await self.service.complete(req), self.replica)
        return result

    async def tokenize(self, call: TokenizeCall) -> Tokens | ErrorEvent:
        return await self.service.tokenize(call)

    async def detokenize(self, call: DetokenizeCall) -> Text | ErrorEvent:
        return await self.service.detokenize(call)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _admit(self, streams: list[RequestStream]) -> list[ServeError | None]:
        """Ray Serve dynamic batching at admission (when ``batch_wait_timeout_s`` > 0): requests arriving within
        the window enter the engine in one command, so their prompts prefill in one llama batch. It returns once
        they are admitted: generation itself is continuous, so a short request never waits for a long one."""
        return self.service.submit_together(streams)
