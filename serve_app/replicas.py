"""Every replica of a deployment, not just the one a handle call happens to reach.

A Serve handle routes each call to ONE replica, so ``/stats``, readiness, the RunPod worker's concurrency and the
drain would see one LlamaModel replica of many. ``Replicas`` asks Serve's controller for the running replicas
(cached for ``list_ttl_s``) and calls a method on each of them (``serve_app.ray_private``); ``combine`` folds
their ``ModelInfo``s into one: capacity and load summed, state ``ready`` when any replica can serve.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from serve_app import ray_private
from serve_app.errors import exception_line
from serve_app.protocol import ModelInfo

log = logging.getLogger("ray.serve")

# Summed over replicas; every other field comes from the replica that speaks for the set.
SUMMED = ("slots_total", "slots_busy", "waiting", "kv_cells_used", "kv_cells_total", "tokens_generated",
          "tokens_prompt", "preemptions")


class Replicas:
    """One deployment's running replicas; ``call`` reaches each of them once."""

    def __init__(self, app_name: str, deployment: str, *, timeout_s: float = 3.0, list_ttl_s: float = 2.0) -> None:
        self.app_name = app_name
        self.deployment = deployment
        self.timeout_s = timeout_s
        self.list_ttl_s = list_ttl_s
        self._actors: dict[str, Any] = {}
        self._listed_at = float("-inf")

    async def actors(self) -> dict[str, Any]:
        if time.monotonic() - self._listed_at > self.list_ttl_s:
            self._actors = await ray_private.replica_actors(self.app_name, self.deployment, self.timeout_s)
            self._listed_at = time.monotonic()
        return self._actors

    async def call(self, method: str, *args: Any, timeout_s: float | None = None) -> dict[str, Any]:
        """``{replica id: result or the exception it raised}``, every replica called at once. Raises only when
        the controller cannot be asked (the caller falls back to a plain handle call)."""
        actors = await self.actors()
        wait = timeout_s if timeout_s is not None else self.timeout_s

        async def one(actor: Any) -> Any:
            return await asyncio.wait_for(_await(ray_private.call_replica(actor, self.app_name, method, *args)),
                                          wait)

        results = await asyncio.gather(*(one(a) for a in actors.values()), return_exceptions=True)
        if any(isinstance(r, BaseException) for r in results):
            self._listed_at = float("-inf")  # a replica went away or is new: list again next time
        return dict(zip(actors, results, strict=True))

    async def infos(self) -> dict[str, ModelInfo]:
        """``info()`` of every replica that answered; the others are left out (restarting, or gone)."""
        out: dict[str, ModelInfo] = {}
        for rid, result in (await self.call("info")).items():
            if isinstance(result, ModelInfo):
                out[rid] = result
            else:
                log.info("replica %s of %s did not report: %s", rid, self.deployment,
                         exception_line(result, 200) if isinstance(result, BaseException) else type(result))
        return out


async def _await(ref: Any) -> Any:
    return await ref


def combine(infos: list[ModelInfo]) -> ModelInfo:
    """One ``ModelInfo`` for a set of replicas: ``ready`` when any is ready (it takes requests), else
    ``loading`` when any is still on its way, else the first one's state (``failed`` with its reason). Capacity
    and load are summed; the rest (model, phases, plan, file) comes from the replica speaking for the set."""
    if not infos:
        raise ValueError("no replica reported")
    order = {"ready": 0, "loading": 1}
    lead = min(infos, key=lambda i: order.get(i.state, 2))
    sums = {f: sum(getattr(i, f) for i in infos) for f in SUMMED}
    return lead.model_copy(update=sums)
