"""The OpenAI-compatible service: one code path for HTTP routes and RunPod jobs.

Each method that takes a body validates it (``parse``), calls LlamaModel through its handle, and returns an OpenAI
response dict or, streaming, an ``EventStream`` of SSE strings. Bodies arrive already walked by their transport's
JSON check (``serve_app.jsonsafe``, run once by ``ingress/body`` and ``runpod/input``). Errors are raised as typed
``ServeError``s; each transport has one translator for them (``replies``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from pydantic import BaseModel, ValidationError

from serve_app.errors import InvalidRequestError, ModelNotFoundError, NotReadyError, invalid_request
from serve_app.protocol import (
    DetokenizeCall,
    Done,
    ErrorEvent,
    Event,
    GenerateRequest,
    ModelInfo,
    TokenizeCall,
    raise_if_error,
)
from serve_app.ray_errors import ray_failure
from serve_app.routes import CHAT, COMPLETIONS, response_id
from serve_app.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    model_card,
    now,
)

from .logprobs import chat_logprobs, completion_logprobs
from .sse import ChunkMaker, EventStream
from .tools import chat_message, chat_messages, tool_fields

log = logging.getLogger("ray.serve")

INFO_TIMEOUT_S = 3.0

Reply = dict[str, Any] | EventStream


def parse(model_cls: type[BaseModel], body: Any) -> Any:
    """A body (from HTTP or a RunPod job, its JSON already checked by the transport) as a request model. Unknown
    OpenAI fields are accepted and logged."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    try:
        req = model_cls.model_validate(body)
    except ValidationError as e:
        raise invalid_request(e) from None
    unknown = req.unknown_fields() if hasattr(req, "unknown_fields") else []
    if unknown:
        log.info("ignoring unsupported request fields: %s", ", ".join(unknown))
    return req


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

    async def info(self) -> ModelInfo:
        # While LlamaModel has no live replica (restarting after a crash) a handle call waits for one; a readiness
        # probe must get its 503 quickly instead.
        try:
            info: ModelInfo = await asyncio.wait_for(_call(self.model.info.remote()), INFO_TIMEOUT_S)
            return info
        except TimeoutError:
            raise NotReadyError(f"the model server did not answer within {INFO_TIMEOUT_S:.0f} s (restarting?)") \
                from None

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [model_card(self.model_id)]}

    async def tokenize(self, body: Any) -> dict[str, Any]:
        req: TokenizeRequest = parse(TokenizeRequest, body)
        if req.messages is not None:
            call = TokenizeCall(messages=chat_messages(req.messages), add_special=req.add_special)
        else:
            call = TokenizeCall(text=req.content if req.content is not None else req.prompt,
                                add_special=req.add_special)
        return raise_if_error(await _call(self.model.tokenize.remote(call))).model_dump()

    async def detokenize(self, body: Any) -> dict[str, Any]:
        req: DetokenizeRequest = parse(DetokenizeRequest, body)
        call = DetokenizeCall(tokens=tuple(req.tokens))
        return raise_if_error(await _call(self.model.detokenize.remote(call))).model_dump()

    # ---- generation ----------------------------------------------------------------------------------------

    async def chat(self, body: Any, request_id: str | None = None) -> Reply:
        req: ChatCompletionRequest = parse(ChatCompletionRequest, body)
        self._check_model(req.model)
        gen = GenerateRequest(label=request_id or response_id(CHAT), messages=chat_messages(req.messages),
                              params=req.to_sampling_params(self.default_max_tokens), stream=req.stream,
                              **tool_fields(req))
        return await self._run(gen, chat=True, include_usage=req.include_usage)

    async def completions(self, body: Any, request_id: str | None = None) -> Reply:
        req: CompletionRequest = parse(CompletionRequest, body)
        self._check_model(req.model)
        prompt = req.prompt_value()
        gen = GenerateRequest(label=request_id or response_id(COMPLETIONS),
                              prompt=tuple(prompt) if isinstance(prompt, list) else prompt,
                              params=req.to_sampling_params(self.default_max_tokens), stream=req.stream)
        return await self._run(gen, chat=False, include_usage=req.include_usage)

    def _check_model(self, model: str | None) -> None:
        if model and model != self.model_id:
            raise ModelNotFoundError(f"model '{model}' is not served here; available: '{self.model_id}'",
                                     param="model")

    async def _run(self, req: GenerateRequest, *, chat: bool, include_usage: bool) -> Reply:
        if not req.stream:
            done: Done = raise_if_error(await _call(self.model.complete.remote(req)))
            return self._full_response(req.label, done, chat)
        gen = self.model.options(stream=True).generate.remote(req)
        try:
            first: Event = await _call(gen.__anext__())
        except StopAsyncIteration:
            raise NotReadyError("the model closed the stream before it started") from None
        except BaseException:  # cancelled (the client left) or failed before the first event: free the slot
            gen.cancel()
            raise
        if isinstance(first, ErrorEvent):
            gen.cancel()
            raise first.error
        return EventStream(gen, first, ChunkMaker(req.label, self.model_id, now(), chat), include_usage)

    def _full_response(self, rid: str, done: Done, chat: bool) -> dict[str, Any]:
        text = done.text or ""
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": chat_message(done),
                                      "logprobs": chat_logprobs(done.logprobs), "finish_reason": done.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": completion_logprobs(done.logprobs),
                      "finish_reason": done.finish_reason}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now(),
                "model": self.model_id, "choices": [choice], "usage": done.usage.model_dump(),
                "timings": done.timings.model_dump()}

