"""``ModelCache``: the Ray Serve deployment that owns the model volume for an application.

Errors are values, as on the rest of the token path (``serve_app.protocol``): each method answers with its result
model (``CachedFile``, ``CacheStatus``, a list of ``CachedFile``, or None for ``invalidate``) or with an
``ErrorEvent`` carrying the typed ``ServeError`` (an unexpected exception becomes ``internal_error``); callers
unwrap with ``raise_if_error(await handle.ensure.remote(ref))``. Blocking work (hashing, downloads, lock waits) runs
in a thread pool sized to ``max_ongoing_requests`` (like ``asyncio.to_thread``, with enough threads) so one slow
pull never stalls the replica's event loop; replicas on other nodes or RunPod workers sharing the volume
coordinate through the per-file locks in ``layout.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from pydantic import ValidationError
from ray import serve

from serve_app.cache.store import CachedFile, CacheStatus, ModelStore, StoreStats
from serve_app.config import DownloadConfig, ModelRef
from serve_app.errors import InvalidModelReferenceError, ServeError, exception_line, invalid_request
from serve_app.metrics import CacheMetrics
from serve_app.protocol import ErrorEvent

log = logging.getLogger("serve_app.cache")
T = TypeVar("T")
MAX_ONGOING = 64  # concurrent calls, one pool thread each (ensure blocks on a lock or a download)


@serve.deployment
class ModelCache:
    def __init__(self, cache_dir: str, download: dict | None = None) -> None:
        # Replica logs are not a terminal: periodic progress lines instead of a bar.
        self._store = ModelStore(cache_dir, DownloadConfig(**(download or {})), progress="log")
        self._metrics = CacheMetrics()
        self._reported = StoreStats()
        # Not the default executor (cpu+4 threads): callers waiting on another replica's download hold a thread
        # each, and must not starve status/list calls.
        self._pool = ThreadPoolExecutor(max_workers=MAX_ONGOING, thread_name_prefix="model-cache")

    async def _call(self, name: str, fn: Callable[[], T]) -> T | ErrorEvent:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        except ValidationError as err:
            return self._failed(invalid_request(err, InvalidModelReferenceError))
        except ServeError as err:
            log.warning("model cache %s failed: %s", name, err.message)
            return self._failed(err)
        except Exception as err:
            log.warning("model cache %s failed unexpectedly", name, exc_info=True)
            return self._failed(ServeError(f"model cache internal error: {exception_line(err)}"))
        finally:
            self._report()

    def _failed(self, err: ServeError) -> ErrorEvent:
        self._metrics.errors.inc(tags={"code": err.code})
        return ErrorEvent(err)

    def _report(self) -> None:
        """Push the store's counters to Ray's metrics as increments since the last report."""
        now, last = self._store.stats, self._reported
        for name, counter in (("hits", self._metrics.hits), ("misses", self._metrics.misses),
                              ("downloads", self._metrics.downloads),
                              ("download_bytes", self._metrics.download_bytes),
                              ("verify_failures", self._metrics.verify_failures)):
            delta = getattr(now, name) - getattr(last, name)
            if delta > 0:
                counter.inc(delta)
                setattr(last, name, getattr(now, name))

    async def ensure(self, ref: dict) -> CachedFile | ErrorEvent:
        return await self._call("ensure", lambda: self._store.ensure(ModelRef(**ref)))

    async def status(self, ref: dict) -> CacheStatus | ErrorEvent:
        return await self._call("status", lambda: self._store.status(ModelRef(**ref)))

    async def verify(self, ref: dict) -> CacheStatus | ErrorEvent:
        return await self._call("verify", lambda: self._store.verify(ModelRef(**ref)))

    async def heal(self, ref: dict) -> CachedFile | ErrorEvent:
        return await self._call("heal", lambda: self._store.heal(ModelRef(**ref)))

    async def invalidate(self, ref: dict) -> None | ErrorEvent:
        return await self._call("invalidate", lambda: self._store.invalidate(ModelRef(**ref)))

    async def list(self) -> list[CachedFile] | ErrorEvent:
        return await self._call("list", self._store.list)
