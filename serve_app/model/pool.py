"""The on-demand model pool (``max_models_per_replica`` >= 1): the chat models of ``models:`` behind one
``LlamaModel`` deployment whose replicas load a model on its first request and hold at most N of them.

Ray Serve model multiplexing does the bookkeeping that must be cluster-wide: each replica reports the models it
holds, and callers that name a model (``handle.options(multiplexed_model_id=...)``, set by the Ingress) are routed
to a replica that holds it, else to the one holding the fewest. Serve evicts the least recently used model when a
replica needs room; what it does not do is wait for that model's requests. ``Resident`` adds that: an evicted model
stops taking calls, its running requests get ``eviction_grace_s`` to finish, and whatever still runs then ends with
a retryable ``model_unloaded`` error (a clean end of stream, never a hang or a half-freed engine). Only then is its
memory freed and the next model loaded, so a replica never holds more than N engines.

Why this and not one deployment per model (the default, ``max_models_per_replica: 0``): each deployment holds its
own GPU, so N models need N GPUs and stay loaded; the pool puts any number of models on one GPU per replica, paying
a model load on a miss, as llama-server's router mode and Ollama do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import AppArgs
from serve_app.errors import EngineDeadError, InvalidRequestError, ModelUnloadedError, ServeError
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
from serve_app.replicas import combine

from .loading import cache_fetch, public_reason
from .service import ModelService, report_gauges, stamp_replica

log = logging.getLogger("ray.serve")
T = TypeVar("T")


class Resident:
    """One model a pool replica holds: its ``ModelService``, the calls running on it, and how it leaves."""

    def __init__(self, name: str, service: ModelService, loop: asyncio.AbstractEventLoop, grace_s: float,
                 on_gone: Callable[[Resident], None]) -> None:
        self.name = name
        self.service = service
        self.loop = loop
        self.grace_s = grace_s
        self.on_gone = on_gone
        self.running = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.retiring = False  # evicted: its running calls may finish; new ones are refused
        self.cut = False  # the grace period ran out: what still ran was ended with model_unloaded
        self.closed = False

    def _unloaded(self) -> ModelUnloadedError:
        return ModelUnloadedError(f"model '{self.name}' was unloaded to make room for another; send the request "
                                  f"again to load it")

    async def call(self, fn: Callable[[ModelService], Awaitable[T]]) -> T | ErrorEvent:
        """A one-shot call (complete, tokenize, detokenize) on the service, counted as running."""
        if self.retiring:
            return ErrorEvent(self._unloaded())
        self._enter()
        try:
            result = await fn(self.service)
        finally:
            self._leave()
        if self.cut and isinstance(result, ErrorEvent) and isinstance(result.error, EngineDeadError):
            return ErrorEvent(self._unloaded())
        return result

    async def generate(self, events: Callable[[ModelService], AsyncIterator[Event]]) -> AsyncIterator[Event]:
        if self.retiring:
            yield ErrorEvent(self._unloaded())
            return
        self._enter()
        try:
            async for ev in events(self.service):
                if self.cut and isinstance(ev, ErrorEvent) and isinstance(ev.error, EngineDeadError):
                    ev = ErrorEvent(self._unloaded())
                yield ev
        finally:
            self._leave()

    def _enter(self) -> None:
        self.running += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.running -= 1
        if self.running == 0:
            self._idle.set()

    async def retire(self) -> None:
        """Stop taking calls, let running ones finish (at most ``grace_s``), then free the model."""
        if self.retiring:
            return
        self.retiring = True
        try:
            await asyncio.wait_for(self._idle.wait(), self.grace_s)
        except TimeoutError:
            self.cut = True
            log.warning("model %s unloaded with %d requests still running after %.0f s; they end with "
                        "model_unloaded", self.name, self.running, self.grace_s)
        try:
            await self.service.aclose()
        finally:
            self.closed = True
            self.on_gone(self)
        log.info("model %s unloaded", self.name)

    def __del__(self) -> None:
        # Ray Serve's multiplexer calls this from a worker thread when it evicts the model, and waits for it before
        # loading the next one: block that thread until the model is retired on the replica's loop. Called again
        # by garbage collection (or on the loop itself), it only frees what is still held, without waiting.
        if self.closed:
            return
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_loop = False
        if self.retiring:
            return
        if on_loop or self.loop.is_closed():
            self.closed = True
            self.service.close()
            return
        asyncio.run_coroutine_threadsafe(self.retire(), self.loop).result()


class PoolState:
    """What a pool replica holds, in least-recently-used order, and how it reports itself."""

    def __init__(self, label: str, names: list[str]) -> None:
        self.label = label
        self.names = names
        self.residents: dict[str, Resident] = {}
        self.preloading = True
        self.failures: dict[str, str] = {}  # model -> client-safe reason of its last failed load

    def touch(self, r: Resident) -> None:
        self.failures.pop(r.name, None)
        self.residents.pop(r.name, None)
        self.residents[r.name] = r

    def gone(self, r: Resident) -> None:
        if self.residents.get(r.name) is r:
            del self.residents[r.name]

    def live(self) -> list[Resident]:
        return [r for r in self.residents.values() if not r.closed]

    async def info(self) -> ModelInfo:
        """The replica as one model: ``loading`` while it preloads, then ``ready`` (any served model can be
        loaded on request), ``failed`` when a held model's engine died; slots and load summed over held models."""
        held = self.live()
        infos = [await r.service.info() for r in held]
        base = ModelInfo(state="loading" if self.preloading else "ready", model=self.label)
        if infos:
            base = combine(infos).model_copy(update={"model": self.label, "state": base.state, "reason": None,
                                                     "detail": None})
        dead = next((i for i in infos if i.state == "failed"), None)
        if dead is not None:
            base = base.model_copy(update={"state": "failed", "reason": dead.reason, "detail": dead.detail})
        elif not held and not self.preloading and self.failures:
            # Nothing held and the models tried could not load: nothing would be served, so not ready.
            name, why = next(iter(self.failures.items()))
            base = base.model_copy(update={"state": "failed", "reason": f"{name}: {why}"})
        return base.model_copy(update={"loaded_models": [r.name for r in held]})

    def health_problem(self) -> str | None:
        for r in self.live():
            problem = r.service.health_problem()
            if problem is not None:
                return f"{r.name}: {problem}"
        return None


def load_error(e: BaseException, name: str) -> ServeError:
    """A failed on-demand load as the request's error: its type (code, status) with the client-safe reason
    ``/ready`` would show (no paths); the whole failure goes to the log."""
    if isinstance(e, ServeError):
        log.warning("model %s could not be loaded: %s: %s", name, e.code, e.message)
        return type(e)(f"model '{name}' could not be loaded ({public_reason(e)})", param="model")
    log.error("model %s could not be loaded: %s: %s", name, type(e).__name__, e)
    return ServeError(f"model '{name}' could not be loaded (see the replica log)")


@serve.deployment
class LlamaPool:
    """The ``LlamaModel`` deployment of the on-demand pool; the same handle API as ``LlamaModel``, each call for
    the model its handle names (``serve.get_multiplexed_model_id``)."""

    def __init__(self, cache: DeploymentHandle, models: dict[str, dict[str, Any]], use_gpu: bool, max_loaded: int,
                 grace_s: float, label: str) -> None:
        self.cache = cache
        self.args = {name: AppArgs.model_validate(a) for name, a in models.items()}
        self.use_gpu = use_gpu
        self.grace_s = grace_s
        self.metrics = ModelMetrics()
        self.loop = asyncio.get_running_loop()
        self.pool = PoolState(label, list(self.args))
        self.replica = serve.get_replica_context().replica_id.unique_id

        async def load(name: str) -> Resident:
            return await self._open(name)

        # Set per instance: the limit comes from the config, and Serve detects multiplexing on the instance too.
        self._held = serve.multiplexed(max_num_models_per_replica=max_loaded)(load)
        self._tasks = [self.loop.create_task(self._preload(list(self.args)[:max_loaded])),
                       self.loop.create_task(self._report_gauges())]

    async def _open(self, name: str) -> Resident:
        args = self.args.get(name)
        if args is None:
            raise InvalidRequestError(f"model '{name}' is not in this pool", param="model")
        log.info("loading model %s on demand (held: %s)", name, ", ".join(self.pool.residents) or "none")
        service = ModelService(args, cache_fetch(self.cache), self.use_gpu, metrics=self.metrics, gauges=False)
        await service.load()
        r = Resident(name, service, self.loop, self.grace_s, self.pool.gone)
        self.pool.touch(r)
        return r

    async def _preload(self, names: list[str]) -> None:
        """Load the first ``max_loaded`` models before any request (the first listed is the default model)."""
        try:
            for name in names:
                try:
                    await self._held(name)
                except Exception as e:  # the request that needs it will try again and get the error
                    self.pool.failures[name] = public_reason(load_error(e, name))
                    log.warning("preloading model %s failed", name)
        finally:
            self.pool.preloading = False

    async def _report_gauges(self) -> None:
        while True:
            try:
                stats = [s for r in self.pool.live() if (s := r.service.engine_stats()) is not None]
                await report_gauges(self.metrics, stats, self.use_gpu)
            except Exception:  # metrics must never take the replica down
                log.debug("gauge update failed", exc_info=True)
            await asyncio.sleep(1.0)

    async def _resident(self) -> Resident:
        name = serve.get_multiplexed_model_id()
        if not name:
            raise InvalidRequestError("a pooled model is called without its name", param="model")
        for _ in range(2):  # a model evicted between its lookup and this call's start is loaded once more
            try:
                known = self.pool.residents.get(name)
                if known is not None and not known.retiring:
                    r = cast(Resident, await self._held(name))  # held: only marks it most recently used
                else:
                    # A load outlives the request that caused it: a client leaving mid-load must not throw away
                    # the work (or leave Serve's multiplexer believing the model is on its way).
                    r = cast(Resident, await asyncio.shield(asyncio.ensure_future(self._held(name))))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                err = load_error(e, name)
                self.pool.failures[name] = public_reason(err)
                raise err from None
            if not r.retiring:
                self.pool.touch(r)
                return r
        raise ModelUnloadedError(f"model '{name}' is being unloaded; send the request again")

    # ---- Ray Serve hooks -----------------------------------------------------------------------------------

    def check_health(self) -> None:
        problem = self.pool.health_problem()
        if problem is not None:
            raise RuntimeError(problem)

    def __del__(self) -> None:
        for task in getattr(self, "_tasks", []):
            task.cancel()
        for r in list(getattr(self, "pool", PoolState("", [])).residents.values()):
            if not r.closed:
                r.closed = True
                r.service.close()

    # ---- API used by the ingress (LlamaModel's) ------------------------------------------------------------

    async def info(self) -> ModelInfo:
        return await self.pool.info()

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Event]:
        try:
            r = await self._resident()
        except ServeError as e:
            yield ErrorEvent(e)
            return
        async for ev in r.generate(lambda s: s.generate(req)):
            yield stamp_replica(ev, self.replica)

    async def complete(self, req: GenerateRequest) -> Done | ErrorEvent:
        return cast(Done | ErrorEvent, stamp_replica(await self._one_shot(lambda s: s.complete(req)), self.replica))

    async def tokenize(self, call: TokenizeCall) -> Tokens | ErrorEvent:
        return cast(Tokens | ErrorEvent, await self._one_shot(lambda s: s.tokenize(call)))

    async def detokenize(self, call: DetokenizeCall) -> Text | ErrorEvent:
        return cast(Text | ErrorEvent, await self._one_shot(lambda s: s.detokenize(call)))

    async def _one_shot(self, fn: Callable[[ModelService], Awaitable[T]]) -> T | ErrorEvent:
        try:
            r = await self._resident()
        except ServeError as e:
            return ErrorEvent(e)
        return await r.call(fn)
