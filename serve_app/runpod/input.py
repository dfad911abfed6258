"""RunPod job input -> one ingress call. Pure (pydantic + stdlib): no Ray, no runpod, no engine.

``normalise`` first walks the raw input once with the one JSON sanity walk (``serve_app.jsonsafe.check_json``:
the size limit as ``request_too_large``, nesting, lone UTF-16 surrogates, NaN / Infinity), before any other work;
this is the only place a RunPod body is walked (the ingress validates its shape, not this again).

Accepted shapes (worker-vllm compatible; anything else is an ``InvalidRequestError`` with a readable message):

* OpenAI gateway: ``{"openai_route": "/v1/chat/completions" | "/v1/completions" | "/v1/models" | "/v1/embeddings",
  "openai_input": {<OpenAI request body>}}``. ``openai_route`` defaults to chat completions when only
  ``openai_input`` is given; ``openai_route`` alone (or with an empty ``openai_input``) is a GET, which only
  ``/v1/models`` answers. Streaming follows ``openai_input.stream``.
* worker-vllm's generic proxy form: ``{"route": ..., "body": {...}, "method": "GET" | "POST"}``, same routes.
* Legacy: ``{"messages": [...]} | {"prompt": "..."}`` plus optional ``"sampling_params": {...}`` (merged into the
  OpenAI body; vLLM's ``repetition_penalty`` becomes ``repeat_penalty``) and ``"stream": bool``. worker-vllm's
  ``apply_chat_template`` turns a string prompt into one user message; its output-batching knobs
  (``max_batch_size``, ``min_batch_size``, ``batch_size_growth_factor``) and ``use_openai_format`` are accepted
  and ignored (output is always OpenAI-shaped; stream chunks are forwarded as they come).

A missing ``model`` stays missing: the ingress serves one model and fills it in.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from serve_app.errors import InvalidRequestError, first_error, invalid_request
from serve_app.jsonsafe import check_json, show
from serve_app.routes import CHAT, COMPLETIONS, MODELS, OPENAI_ROUTES
from serve_app.settings import Settings

DEFAULT_MAX_INPUT_BYTES: int = Settings.model_fields["runpod_max_input_bytes"].default

# Body keys the legacy shape owns; sampling_params may not override them.
_RESERVED = frozenset({"messages", "prompt", "stream"})
# vLLM SamplingParams names that differ from ours.
_RENAMES = {"repetition_penalty": "repeat_penalty"}


# ---- the shapes ---------------------------------------------------------------------------------------------


class IngressCall(BaseModel):
    """What the handler sends to ``Ingress.openai`` / ``Ingress.openai_stream``."""

    model_config = ConfigDict(frozen=True)

    route: str
    body: dict[str, Any] | None = None
    stream: bool = False


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OpenAIJobInput(_Strict):
    openai_route: str | None = None
    openai_input: dict[str, Any] | None = None


class ProxyJobInput(_Strict):
    route: str
    body: dict[str, Any] | None = None
    method: Literal["GET", "POST", "get", "post"] | None = None


class LegacyJobInput(_Strict):
    messages: list[dict[str, Any]] | None = Field(default=None, min_length=1)
    prompt: str | list[str] | list[int] | None = None
    sampling_params: dict[str, Any] = Field(default_factory=dict)
    stream: StrictBool = False
    apply_chat_template: StrictBool = False
    use_openai_format: StrictBool = True
    max_batch_size: int | None = Field(default=None, ge=1)
    min_batch_size: int | None = Field(default=None, ge=1)
    batch_size_growth_factor: float | None = Field(default=None, gt=0)


_SHAPES: dict[type[_Strict], str] = {
    OpenAIJobInput: "an OpenAI job ('openai_route', 'openai_input')",
    ProxyJobInput: "a route job ('route', 'body', 'method')",
    LegacyJobInput: "a legacy job ('messages' or 'prompt', 'sampling_params', 'stream')",
}


M = TypeVar("M", bound=_Strict)


def _validate(cls: type[M], raw: dict[str, Any]) -> M:
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        first = first_error(e)
        if first is None or first["type"] != "extra_forbidden":
            raise invalid_request(e) from None
        loc = ".".join(show(str(x)) for x in first["loc"])
        allowed = ", ".join(f"'{k}'" for k in cls.model_fields)
        raise InvalidRequestError(
            f"unknown key '{loc}' in the job input of {_SHAPES[cls]}; accepted keys: {allowed}", param=loc
        ) from None


def _route(route: str | None, param: str) -> str:
    if route is None:
        return CHAT
    norm = "/" + route.strip().strip("/")
    if norm not in OPENAI_ROUTES:
        raise InvalidRequestError(f"unsupported {param} '{show(route, 80)}'; supported: {', '.join(OPENAI_ROUTES)}",
                                  param=param)
    return norm


def _request(route: str, body: dict[str, Any] | None, param: str) -> IngressCall:
    """A call on ``route``: GET-like without a body, else an OpenAI body whose ``stream`` picks the method."""
    if route == MODELS:
        return IngressCall(route=MODELS)
    if not body:
        raise InvalidRequestError(f"{param} (the OpenAI request body) is required for {route}", param=param)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequestError(f"{param}.stream must be true or false", param=f"{param}.stream")
    return IngressCall(route=route, body=dict(body), stream=stream)


def _legacy(job: LegacyJobInput) -> IngressCall:
    if (job.messages is None) == (job.prompt is None):
        raise InvalidRequestError("give exactly one of 'messages' or 'prompt'", param="messages")
    clash = sorted(_RESERVED & job.sampling_params.keys())
    if clash:
        raise InvalidRequestError(
            f"sampling_params may not set {', '.join(repr(k) for k in clash)}; put it at the top level of the input",
            param=f"sampling_params.{clash[0]}",
        )
    body: dict[str, Any] = {}
    for key, value in job.sampling_params.items():
        new = _RENAMES.get(key, key)
        if new != key and new in job.sampling_params:
            continue  # our own name wins when both are given
        body[new] = value
    body["stream"] = job.stream
    if job.messages is not None:
        return IngressCall(route=CHAT, body={**body, "messages": job.messages}, stream=job.stream)
    if job.apply_chat_template:
        if not isinstance(job.prompt, str):
            raise InvalidRequestError("apply_chat_template needs a string prompt", param="prompt")
        return IngressCall(route=CHAT, body={**body, "messages": [{"role": "user", "content": job.prompt}]},
                           stream=job.stream)
    return IngressCall(route=COMPLETIONS, body={**body, "prompt": job.prompt}, stream=job.stream)


def normalise(raw: Any, max_bytes: int = DEFAULT_MAX_INPUT_BYTES) -> IngressCall:
    """Check a job's ``input`` (``jsonsafe.check_json``), validate its shape and turn it into one ingress call.
    Raises ``InvalidRequestError`` or ``RequestTooLargeError``."""
    check_json(raw, root="input", max_bytes=max_bytes)
    if not isinstance(raw, dict):
        raise InvalidRequestError(f"the job input must be a JSON object, got {type(raw).__name__}", param="input")
    keys = set(raw)
    if keys & {"openai_route", "openai_input"}:
        oa = _validate(OpenAIJobInput, raw)
        return _request(_route(oa.openai_route, "openai_route"), oa.openai_input, "openai_input")
    if "route" in keys:
        px = _validate(ProxyJobInput, raw)
        route = _route(px.route, "route")
        if px.method is not None and px.method.upper() == "GET" and route != MODELS:
            raise InvalidRequestError(f"{route} needs method POST", param="method")
        return _request(route, px.body, "body")
    if keys & {"messages", "prompt"}:
        return _legacy(_validate(LegacyJobInput, raw))
    got = ", ".join(f"'{show(str(k))}'" for k in sorted(keys, key=str)) or "none"
    raise InvalidRequestError(
        "unrecognised job input: expected 'openai_route'/'openai_input' (OpenAI), or 'messages'/'prompt' with "
        f"optional 'sampling_params' and 'stream' (legacy); got keys: {got}", param="input")
