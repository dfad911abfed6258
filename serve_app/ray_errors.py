"""Ray's transport failures as our typed errors, for every caller of a Serve handle (the ingress calling
LlamaModel, the RunPod worker calling the ingress): a client sees a retryable 503 or 429, never a Ray traceback."""

from __future__ import annotations

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)

from serve_app.errors import EngineDeadError, NotReadyError, QueueFullError, ServeError


def unwrap_cause(exc: BaseException) -> BaseException:
    return exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc


def ray_failure(exc: BaseException) -> ServeError | None:
    """The typed error for a failure of the call itself (replica gone, back-pressure, application unavailable,
    cancelled) or a ``ServeError`` raised remotely; None for anything else (a bug: the caller logs it)."""
    cause = unwrap_cause(exc)
    if isinstance(cause, ServeError) and not isinstance(cause, RayTaskError):
        return cause
    if isinstance(cause, BackPressureError):
        return QueueFullError("the model server is at capacity; retry later")
    if isinstance(cause, RequestCancelledError):
        return ServeError("the request was cancelled")
    if isinstance(cause, DeploymentUnavailableError):
        return NotReadyError("the model server application is not available; retry later")
    if isinstance(cause, RayActorError | ReplicaUnavailableError):
        return EngineDeadError(f"the model server process went away ({type(cause).__name__}); retry the request")
    return None
