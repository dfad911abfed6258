"""One typed error tree for the whole service.

Every error carries a stable machine ``code``, the HTTP ``status`` a transport should map it to, and whether a
retry may help. Messages go to the client who caused them: they may quote what that client sent, never a token
or a traceback. Unauthenticated surfaces (``/ready``) show only fixed phrases per code (``model/loading.py``).
Each transport (HTTP JSON and SSE in ``ingress/replies.py``, RunPod output in ``runpod/handler.py``, the CLIs)
has one translator; nothing here knows about HTTP libraries.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import ValidationError
from pydantic_core import ErrorDetails


class ServeError(Exception):
    """Base of every error we raise on purpose."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI-style error body (without the outer ``{"error": ...}``)."""
        return {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep keyword-only ``param`` across pickling (Ray ships exceptions between processes).
        return (_rebuild, (type(self), self.message, self.param))


def _rebuild(cls: type[ServeError], message: str, param: str | None) -> ServeError:
    return cls(message, param=param)


# ---- client errors (4xx) ---------------------------------------------------------------------------------------


class InvalidRequestError(ServeError):
    code = "invalid_request"
    status = 400
    error_type = "invalid_request_error"


class ContextOverflowError(InvalidRequestError):
    code = "context_length_exceeded"


class ModelNotFoundError(ServeError):
    code = "model_not_found"
    status = 404
    error_type = "invalid_request_error"


class NoRouteError(InvalidRequestError):
    code = "not_found"
    status = 404


class MethodNotAllowedError(InvalidRequestError):
    code = "method_not_allowed"
    status = 405


class AuthenticationError(ServeError):
    code = "invalid_api_key"
    status = 401
    error_type = "authentication_error"


class RequestTooLargeError(ServeError):
    code = "request_too_large"
    status = 413
    error_type = "invalid_request_error"


class QueueFullError(ServeError):
    code = "queue_full"
    status = 429
    error_type = "rate_limit_error"
    retryable = True


class NotReadyError(ServeError):
    code = "model_loading"
    status = 503
    error_type = "server_error"
    retryable = True


class ShuttingDownError(NotReadyError):
    code = "shutting_down"


# ---- model source / cache errors ------------------------------------------------------------------------------


class ModelSourceError(ServeError):
    """Something about obtaining the model file went wrong."""

    code = "model_source_error"
    status = 502


class InvalidModelReferenceError(ModelSourceError):
    code = "invalid_model_reference"
    status = 400
    error_type = "invalid_request_error"


class RepoNotFoundError(ModelSourceError):
    code = "repo_not_found"
    status = 404


class GatedRepoError(ModelSourceError):
    code = "gated_repo"
    status = 403


class RemoteFileNotFoundError(ModelSourceError):
    code = "file_not_found"
    status = 404


class LocalFileNotFoundError(ModelSourceError):
    """A local model path (no repo id) that does not exist, or a split GGUF with parts missing beside it."""

    code = "local_file_not_found"
    status = 404


class RevisionNotFoundError(ModelSourceError):
    code = "revision_not_found"
    status = 404


class HubUnreachableError(ModelSourceError):
    code = "hub_unreachable"
    status = 503
    retryable = True


class DownloadError(ModelSourceError):
    code = "download_failed"
    retryable = True


class IntegrityError(ModelSourceError):
    code = "integrity_error"


class NotCachedError(ModelSourceError):
    """Offline mode and the file is not on the volume."""

    code = "not_cached"
    status = 503


# ---- engine errors -------------------------------------------------------------------------------------------


class EngineError(ServeError):
    code = "engine_error"


class ModelLoadError(EngineError):
    code = "model_load_failed"


class OutOfMemoryError(ModelLoadError):
    code = "out_of_memory"


class EngineDeadError(EngineError):
    code = "engine_dead"
    status = 503
    retryable = True


class ModelUnloadedError(EngineError):
    """A pooled model was unloaded to make room for another while this request still ran (past the eviction
    grace period): the same request sent again loads it again."""

    code = "model_unloaded"
    status = 503
    retryable = True


class KVCacheFullError(EngineError):
    """The KV cache has no room for a request even with nothing else running: a retry may land on a replica or a
    moment with room, or the request can be made shorter."""

    code = "kv_cache_full"
    status = 503
    retryable = True


ERRORS_BY_CODE: dict[str, type[ServeError]] = {}


def _index(cls: type[ServeError]) -> None:
    ERRORS_BY_CODE.setdefault(cls.code, cls)
    for sub in cls.__subclasses__():
        _index(sub)


_index(ServeError)



# ---- messages -------------------------------------------------------------------------------------------------


def first_error(exc: ValidationError) -> ErrorDetails | None:
    """The first problem pydantic found (without its input or URL), or None: the one place that picks it."""
    errs = exc.errors(include_url=False, include_input=False)
    return errs[0] if errs else None


def first_problem(exc: ValidationError) -> tuple[str | None, str]:
    """The first problem pydantic found, as (dotted location or None, message): the one conversion every
    validating caller (HTTP, RunPod, CLI, config, the cache manifest) uses, so all of them word a bad field the
    same way."""
    first = first_error(exc)
    if first is None:
        return None, "invalid value"
    loc = ".".join(str(x) for x in first.get("loc", ())) or None
    return loc, str(first.get("msg", "invalid value"))


def invalid_request(exc: ValidationError, cls: type[ServeError] = InvalidRequestError) -> ServeError:
    """A client's bad field as a typed 4xx naming the field (``param``) and the problem."""
    loc, msg = first_problem(exc)
    return cls(f"{loc}: {msg}" if loc else msg, param=loc)


def one_line(text: object, limit: int = 300) -> str:
    """``text`` (a message, a traceback) as one line for a message or a log: its first non-empty line, stripped,
    cut to ``limit`` characters."""
    lines = (ln.strip() for ln in str(text).splitlines())
    out = next((ln for ln in lines if ln), "")
    return out if len(out) <= limit else out[: limit - 3] + "..."


def exception_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line, ``Type: first line of its message`` (just ``Type`` without one)."""
    detail = one_line(exc, limit)
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
