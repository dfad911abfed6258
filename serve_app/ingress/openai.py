"""The OpenAI-compatible service: one code path for HTTP routes and RunPod jobs.

Each method validates a raw body with pydantic, calls LlamaModel through its handle, and returns either an
OpenAI response dict or (streaming) an async iterator of SSE ``data:`` strings. Errors are raised as typed
``ServeError``s; each transport has one translator for them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from serve_app.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    NotReadyError,
    ServeError,
    error_from_dict,
)
from serve_app.ray_errors import ray_failure
from serve_app.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    model_card,
    new_id,
    now,
)

log = logging.getLogger("ray.serve")

DONE = "data: [DONE]\n\n"
INFO_TIMEOUT_S = 3.0


class ModelHandle(Protocol):
    """The subset of a DeploymentHandle to LlamaModel that we use (lets tests inject a plain object)."""

    def options(self, **kw: Any) -> Any: ...


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def parse(model_cls: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    try:
        req = model_cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or None
        raise InvalidRequestError(f"{loc + ': ' if loc else ''}{err['msg']}", param=loc) from None
    unknown = req.unknown_fields() if hasattr(req, "unknown_fields") else []
    if unknown:
        log.info("ignoring unsupported request fields: %s", ", ".join(unknown))
    return req


def _raise_if_error(ev: dict[str, Any]) -> None:
    if ev.get("type") == "error":
        raise error_from_dict(ev["error"])


async def _call(awaitable: Awaitable[Any]) -> Any:
    """Await a handle call; a failure of the call itself (LlamaModel's replica died or is restarting, back-pressure)
    becomes a typed, retryable error instead of a 500. Anything else is a bug and stays itself."""
    try:
        return await awaitable
    except Exception as e:
        typed = ray_failure(e)
        if typed is None:
            raise
        raise typed from None


class OpenAIService:
    def __init__(self, model: Any, model_id: str, default_max_tokens: int) -> None:
        self.model = model
        self.model_id = model_id
        self.default_max_tokens = default_max_tokens

    # ---- small routes --------------------------------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        # While LlamaModel has no live replica (restarting after a crash) a handle call waits for one; a readiness
        # probe must get its 503 quickly instead.
        try:
            return await asyncio.wait_for(_call(self.model.info.remote()), INFO_TIMEOUT_S)
        except TimeoutError:
            raise NotReadyError(f"the model server did not answer within {INFO_TIMEOUT_S:.0f} s (restarting?)") \
                from None

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [model_card(self.model_id)]}

    async def tokenize(self, body: Any) -> dict[str, Any]:
        req: TokenizeRequest = parse(TokenizeRequest, body)
        payload: dict[str, Any] = {"add_special": req.add_special}
        if req.messages is not None:
            payload["messages"] = [{"role": m.role, "content": m.text()} for m in req.messages]
        else:
            payload["text"] = req.content if req.content is not None else req.prompt
        out = await _call(self.model.tokenize.remote(payload))
        _raise_if_error(out)
        return out

    async def detokenize(self, body: Any) -> dict[str, Any]:
        req: DetokenizeRequest = parse(DetokenizeRequest, body)
        out = await _call(self.model.detokenize.remote({"tokens": req.tokens}))
        _raise_if_error(out)
        return out

    # ---- generation ----------------------------------------------------------------------------------------

    async def chat(self, body: Any, request_id: str | None = None) -> dict[str, Any] | AsyncIterator[str]:
        req: ChatCompletionRequest = parse(ChatCompletionRequest, body)
        self._check_model(req.model)
        payload = {
            "request_id": request_id or new_id("chatcmpl"),
            "messages": [{"role": m.role, "content": m.text()} for m in req.messages],
            "params": req.to_sampling_params(self.default_max_tokens).model_dump(),
        }
        return await self._run(payload, chat=True, stream=req.stream, include_usage=req.include_usage)

    async def completions(self, body: Any, request_id: str | None = None) -> dict[str, Any] | AsyncIterator[str]:
        req: CompletionRequest = parse(CompletionRequest, body)
        self._check_model(req.model)
        payload = {
            "request_id": request_id or new_id("cmpl"),
            "prompt": req.prompt_value(),
            "params": req.to_sampling_params(self.default_max_tokens).model_dump(),
        }
        return await self._run(payload, chat=False, stream=req.stream, include_usage=req.include_usage)

    def _check_model(self, model: str | None) -> None:
        if model and model != self.model_id:
            raise ModelNotFoundError(f"model '{model}' is not served here; available: '{self.model_id}'",
                                     param="model")

    async def _run(self, payload: dict[str, Any], *, chat: bool, stream: bool,
                   include_usage: bool) -> dict[str, Any] | AsyncIterator[str]:
        rid = payload["request_id"]
        if not stream:
            out = await _call(self.model.complete.remote(payload))
            _raise_if_error(out)
            return self._full_response(rid, out, chat)
        gen = self.model.options(stream=True).generate.remote(payload)
        try:
            first = await _call(gen.__anext__())
        except StopAsyncIteration:
            raise NotReadyError("the model closed the stream before it started") from None
        if first.get("type") == "error":
            gen.cancel()
            raise error_from_dict(first["error"])
        return self._sse(rid, first, gen, chat, include_usage)

    def _full_response(self, rid: str, out: dict[str, Any], chat: bool) -> dict[str, Any]:
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": out["text"]},
                                      "logprobs": None, "finish_reason": out["finish_reason"]}
        else:
            choice = {"index": 0, "text": out["text"], "logprobs": None, "finish_reason": out["finish_reason"]}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now(),
                "model": self.model_id, "choices": [choice], "usage": out["usage"], "timings": out["timings"]}

    async def _sse(self, rid: str, first: dict[str, Any], gen: Any, chat: bool,
                   include_usage: bool) -> AsyncIterator[str]:
        created = now()
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, **extra: Any) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {} if text is None else {"content": text}
                c: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                c = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": obj, "created": created, "model": self.model_id, "choices": [c], **extra}

        finished = False
        try:
            if chat:
                head = chunk(None, None)
                head["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                yield sse(head)
            ev: dict[str, Any] | None = first
            while ev is not None:
                kind = ev.get("type")
                if kind == "delta" and ev["text"]:
                    yield sse(chunk(ev["text"], None))
                elif kind == "done":
                    yield sse(chunk(None, ev["finish_reason"], timings=ev["timings"]))
                    if include_usage:
                        yield sse({"id": rid, "object": obj, "created": created, "model": self.model_id,
                                   "choices": [], "usage": ev["usage"]})
                    break
                elif kind == "error":
                    yield sse({"error": ev["error"]})
                    break
                ev = await self._next_event(rid, gen)
            finished = True
            yield DONE
        finally:
            if not finished:  # the client went away: stop generating (frees the slot within one step)
                gen.cancel()

    @staticmethod
    async def _next_event(rid: str, gen: Any) -> dict[str, Any] | None:
        """The next event, or an ``error`` event when the stream itself broke (the model's replica died
        mid-generation): the client gets an error chunk and ``[DONE]``, as from vLLM, not a cut connection."""
        try:
            ev: dict[str, Any] | None = await _call(anext(gen, None))
            return ev
        except ServeError as e:
            err = e
        except Exception as e:
            log.error("stream %s failed: %s: %s", rid, type(e).__name__, e, exc_info=e)
            err = ServeError(f"internal error (request id {rid})")
        return {"type": "error", "error": err.to_dict()}


def error_body(err: ServeError) -> dict[str, Any]:
    return {"error": err.to_dict()}
