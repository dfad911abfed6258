"""Failover for requests that have not started: when LlamaModel's replica goes away (its process or node died)
before a request produced anything the client saw, the request is sent again, to another replica.

Generation has no side effects, so a request is safe to resend until its first event reached the client: a
non-streaming one at any point (the client sees nothing until the end), a streaming one until its first visible
event (tokens whose text is not out yet show nothing).
A stream that already sent chunks cannot be resent without repeating text; it ends with the retryable error chunk
(``sse.EventStream``). Ray's router drops a replica it saw die, so the next attempt goes elsewhere; a short pause
lets it also hear from Serve's controller when a whole node went away.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError

from serve_app.protocol import Delta, Event
from serve_app.ray_errors import unwrap_cause

log = logging.getLogger("ray.serve")

T = TypeVar("T")

ATTEMPTS = 3  # the first call and two resends: two replicas lost under one request is already a bad day
PAUSE_S = 0.25  # before resend n: n * PAUSE_S


def replica_gone(exc: BaseException) -> bool:
    """The call failed because the replica it went to is gone (not because of the request)."""
    cause = unwrap_cause(exc)
    if isinstance(cause, RayActorError | ReplicaUnavailableError):
        return True
    # Serve's direct gRPC channel (by-value handles) surfaces a dead peer as UNAVAILABLE when its own mapping misses.
    return isinstance(cause, grpc.aio.AioRpcError) and cause.code() == grpc.StatusCode.UNAVAILABLE


async def _pause(attempt: int, label: str, exc: BaseException) -> None:
    log.warning("request %s: the model replica went away (%s); resending it (attempt %d of %d)",
                label, type(unwrap_cause(exc)).__name__, attempt + 1, ATTEMPTS)
    await asyncio.sleep(PAUSE_S * attempt)


async def call_with_failover(call: Callable[[], Awaitable[T]], label: str) -> T:
    """``await call()``, made again (a new handle call) when the replica is gone, at most ``ATTEMPTS`` times."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await call()
        except Exception as e:
            if attempt == ATTEMPTS or not replica_gone(e):
                raise
            await _pause(attempt, label, e)
    raise AssertionError("unreachable")


async def open_stream(start: Callable[[], Any], label: str) -> tuple[Any, Event]:
    """A streaming handle call and its first event; started again when the replica is gone before that event.
    Raises ``StopAsyncIteration`` when the stream ends at once. An attempt that fails or is cancelled is
    cancelled on the model's side, so it never holds a slot."""
    for attempt in range(1, ATTEMPTS + 1):
        gen = start()
        try:
            first: Event = await gen.__anext__()
            # A token with no text yet (part of a character, text held back for a stop string) shows the client
            # nothing: the request has not started for it until something visible comes.
            held = 0
            while isinstance(first, Delta) and _invisible(first):
                held += first.n_tokens
                first = await gen.__anext__()
            if held and isinstance(first, Delta):
                first.n_tokens += held
            return gen, first
        except StopAsyncIteration:
            gen.cancel()
            raise
        except Exception as e:
            gen.cancel()
            if attempt == ATTEMPTS or not replica_gone(e):
                raise
            await _pause(attempt, label, e)
        except BaseException:  # cancelled: the client left
            gen.cancel()
            raise
    raise AssertionError("unreachable")


def _invisible(d: Delta) -> bool:
    return not (d.text or d.reasoning or d.tool_calls or d.logprobs)
