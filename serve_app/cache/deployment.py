"""``ModelCache``: the Ray Serve deployment that owns the model volume for an application.

Errors are returned, not raised: every method returns its result, or ``{"error": err.to_dict()}`` where
``err`` is a ``ServeError`` (an unexpected exception becomes ``internal_error``). Callers do
``serve_app.cache.reply.unwrap(await handle.ensure.remote(ref))`` to get the value or the typed error back
(see ``reply.py`` for why). Blocking work (hashing, downloads, lock waits) runs in ``asyncio.to_thread`` so one
slow pull never stalls the replica's event loop; replicas on other nodes or RunPod workers sharing the volume
coordinate through the per-file locks in ``layout.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import ValidationError
from ray import serve

from serve_app.cache.reply import error_reply
from serve_app.cache.store import ModelStore
from serve_app.config import DownloadConfig, ModelRef
from serve_app.errors import InvalidModelReferenceError

log = logging.getLogger("serve_app.cache")
T = TypeVar("T")


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class ModelCache:
    def __init__(self, cache_dir: str, download: dict | None = None) -> None:
        # Replica logs are not a terminal: periodic progress lines instead of a bar.
        self._store = ModelStore(cache_dir, DownloadConfig(**(download or {})), progress="log")

    async def _call(self, name: str, fn: Callable[[], T]) -> T | dict[str, Any]:
        try:
            return await asyncio.to_thread(fn)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "ref"
            return error_reply(InvalidModelReferenceError(f"Invalid model reference ({where}): {first['msg']}"))
        except Exception as err:
            log.warning("model cache %s failed: %s", name, err)
            return error_reply(err)

    async def ensure(self, ref: dict) -> dict:
        return await self._call("ensure", lambda: self._store.ensure(ModelRef(**ref)).model_dump())

    async def status(self, ref: dict) -> dict:
        return await self._call("status", lambda: self._store.status(ModelRef(**ref)).model_dump())

    async def verify(self, ref: dict) -> dict:
        return await self._call("verify", lambda: self._store.verify(ModelRef(**ref)).model_dump())

    async def heal(self, ref: dict) -> dict:
        return await self._call("heal", lambda: self._store.heal(ModelRef(**ref)).model_dump())

    async def invalidate(self, ref: dict) -> dict | None:
        return await self._call("invalidate", lambda: self._store.invalidate(ModelRef(**ref)))

    async def list(self) -> list[dict] | dict:
        return await self._call("list", lambda: [f.model_dump() for f in self._store.list()])
