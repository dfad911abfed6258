"""The RunPod job handler: normalise the job input (``serve_app.runpod.input``), make one call on the ingress
through its Ray handle, and yield one OpenAI response dict, or the ``data: ...`` SSE strings of a stream ending
with ``data: [DONE]``. Every failure is a value, ``{"error": {"message", "type", "param", "code"}}``: no traceback
reaches a client and a bad job never stops the worker. As over HTTP, a typed error goes to the client as itself,
and anything else is a bug: logged with its traceback, while the client's error names only the job id
(``client_error``). The engine and llama_cpp are never imported here.

``Worker`` also holds the concurrency the SDK reads in its tight loop (``concurrency_modifier``), following the
engine's free slots.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ray.serve.handle import DeploymentHandle

from serve_app import ray_private
from serve_app.errors import NotReadyError, ServeError, exception_line
from serve_app.ray_errors import ray_failure, unwrap_cause
from serve_app.routes import response_id
from serve_app.runpod.input import DEFAULT_MAX_INPUT_BYTES, IngressCall, normalise

log = logging.getLogger("serve_app.runpod")

REFRESH_S = 0.5  # how often the concurrency cache is refreshed from Ingress.ready()
READY_CALL_TIMEOUT_S = 10.0


# ---- errors as values ---------------------------------------------------------------------------------------


class ErrorDetail(dict[str, Any]):
    """The ``error`` object of an error item. In production the SDK fails the job with ``str(item["error"])``;
    this dict's ``str`` is its JSON, so the client gets ``{"message", "type", "param", "code"}`` as JSON text
    instead of a Python repr, while the local API and aggregated outputs still see a plain object."""

    def __str__(self) -> str:
        return json.dumps(self, ensure_ascii=False)

    __repr__ = __str__


def as_serve_error(exc: BaseException) -> ServeError:
    """Any exception as a typed error for the worker's own log and start-up lines: a Ray failure or a remote
    ``ServeError`` as itself, anything else as a ``worker error`` naming its type and first line. Clients get
    ``client_error`` instead, which never shows an unexpected exception's text."""
    typed = ray_failure(exc)
    if typed is not None:
        return typed
    return ServeError(f"worker error: {exception_line(unwrap_cause(exc), 300)}")


def client_error(exc: BaseException, job_id: str) -> ServeError:
    """What a client is told of ``exc``: a typed failure as itself; anything else is a bug, logged here with its
    traceback, and the client's error names only the job id to quote (as HTTP's ``replies.internal_error``)."""
    typed = ray_failure(exc)
    if typed is not None:
        return typed
    log.error("job %s failed: %s", job_id, exception_line(unwrap_cause(exc)), exc_info=exc)
    return ServeError(f"worker error: internal error (job id {job_id})")


def error_output(error: BaseException | dict[str, Any], job_id: str | None = None) -> dict[str, Any]:
    """The one translator to a job's error item, from an exception (``client_error``) or from the ingress's own
    error body."""
    if isinstance(error, dict):
        return {"error": ErrorDetail(error)}
    return {"error": ErrorDetail(client_error(error, job_id or "unknown").to_dict())}


def _output(item: Any) -> Any:
    """An item from the ingress as a job output: its ``{"error": {...}}`` values go through ``error_output``."""
    if isinstance(item, dict) and isinstance(item.get("error"), dict):
        return error_output(item["error"])
    return item


# ---- concurrency --------------------------------------------------------------------------------------------


def concurrency_target(info: dict[str, Any], in_flight: int, cap: int | None) -> int | None:
    """How many jobs this worker should hold, from ``Ingress.ready()``; None when the engine gives no figures.

    ``slots_total - slots_busy - waiting`` are the free slots; the jobs this worker is already running are counted
    back in, because the SDK's concurrency is the number of jobs in flight, not new ones (and it stops taking jobs
    until it is idle whenever the value changes, so it must stay steady under our own load).
    """
    total = int(info.get("slots_total") or 0)
    if info.get("state") != "ready" or total <= 0:
        return None
    free = total - int(info.get("slots_busy") or 0) - int(info.get("waiting") or 0)
    upper = min(total, cap) if cap else total
    return max(1, min(upper, free + in_flight))


class Worker:
    """The ingress handle, the job limits, the jobs in flight and the cached concurrency."""

    def __init__(self, cap: int | None = None, max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES) -> None:
        self.handle: DeploymentHandle | None = None
        self.cap = cap
        self.max_input_bytes = max_input_bytes
        self.in_flight = 0
        self.concurrency = 1
        self._pending: int | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._refresh_errors = 0

    def attach(self, handle: DeploymentHandle, info: dict[str, Any], low_latency: bool = True) -> None:
        """Take jobs through ``handle``; by value over Serve's gRPC channel unless ``low_latency`` is off."""
        self.handle = ray_private.by_value(handle) if low_latency else handle
        self.concurrency = concurrency_target(info, 0, self.cap) or 1

    def ingress(self) -> DeploymentHandle:
        if self.handle is None:
            raise NotReadyError("the worker is not connected to the model server yet")
        return self.handle

    def observe(self, target: int | None) -> None:
        """Adopt a new value once two refreshes in a row agree (one stray sample must not stall the SDK)."""
        if target is None or target == self.concurrency:
            self._pending = None
        elif target == self._pending:
            log.info("concurrency %d -> %d", self.concurrency, target)
            self.concurrency, self._pending = target, None
        else:
            self._pending = target

    def modifier(self, current: int) -> int:
        """``concurrency_modifier``: O(1); starts the refresher on the SDK's event loop the first time."""
        if self._refresher is None and self.handle is not None:
            try:
                self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())
            except RuntimeError:
                pass  # not inside a loop: keep the cached value
        return self.concurrency

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                info = await asyncio.wait_for(_await(self.ingress().ready.remote()), READY_CALL_TIMEOUT_S)
            except Exception as e:  # keep the last value; the jobs themselves report a dead server
                self._refresh_errors += 1
                if self._refresh_errors in (1, 10) or self._refresh_errors % 100 == 0:
                    log.warning("concurrency refresh failed (%d times): %s", self._refresh_errors,
                                as_serve_error(e).message)
                continue
            self._refresh_errors = 0
            self.observe(concurrency_target(info, self.in_flight, self.cap))


async def _await(resp: Any) -> Any:
    return await resp


WORKER = Worker()


def concurrency_modifier(current: int) -> int:
    return WORKER.modifier(current)


# ---- the handler --------------------------------------------------------------------------------------------


async def handler(job: dict[str, Any]) -> AsyncIterator[dict[str, Any] | str]:
    """One RunPod job: one OpenAI response dict, or SSE strings (``data: {...}\\n\\n`` ... ``data: [DONE]\\n\\n``),
    or one ``{"error": {...}}``."""
    job_id = str(job.get("id") or uuid.uuid4().hex)
    try:
        call = normalise(job.get("input"), WORKER.max_input_bytes)
        ingress = WORKER.ingress()
    except Exception as e:  # InvalidRequestError / RequestTooLargeError / NotReadyError, or a bug: still a value
        yield error_output(e, job_id)
        return
    request_id = response_id(call.route, job_id)
    WORKER.in_flight += 1
    try:
        if call.stream:
            async for item in _stream(ingress, call, request_id):
                yield _output(item)
        else:
            yield _output(await _unary(ingress, call, request_id))
    except Exception as e:  # Ray errors (a dead actor, backpressure, ...) or a bug: an error item, even mid-stream
        typed = ray_failure(e)
        if typed is not None:  # a bug is logged, with its traceback, by client_error
            log.warning("job %s failed: %s", request_id, typed.message)
        yield error_output(e, job_id)
    finally:
        WORKER.in_flight -= 1


async def _unary(ingress: DeploymentHandle, call: IngressCall, request_id: str) -> dict[str, Any]:
    resp = ingress.openai.remote(call.route, call.body, request_id=request_id)
    try:
        out = await resp
    except asyncio.CancelledError:  # RunPod stopped the job: awaiting alone would not stop the request
        resp.cancel()
        raise
    if not isinstance(out, dict):
        return error_output(ServeError(f"the model server returned {type(out).__name__}, not a response"))
    return out


async def _stream(ingress: DeploymentHandle, call: IngressCall,
                  request_id: str) -> AsyncIterator[dict[str, Any] | str]:
    gen = ingress.options(stream=True).openai_stream.remote(call.route, call.body, request_id=request_id)
    finished = False
    try:
        async for item in gen:
            yield item
        finished = True
    finally:
        if not finished:  # stopped, failed, or the consumer went away: free the engine slot
            gen.cancel()
