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

from serve_app.errors import InvalidRequestError, NotReadyError, invalid_request
from serve_app.protocol import (
    DetokenizeCall,
    Done,
    EmbedCall,
    Embeddings,
    ErrorEvent,
    GenerateRequest,
    ModelInfo,
    TokenizeCall,
    openai_usage,
    raise_if_error,
)
from serve_app.ray_errors import ray_failure
from serve_app.replicas import combine
from serve_app.routes import CHAT, COMPLETIONS, response_id
from serve_app.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
    model_card,
    now,
)

from .embeddings import embedding_response, merge_infos
from .failover import call_with_failover, open_stream
from .logprobs import chat_logprobs, completion_logprobs
from .models import ModelTable, Served
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
    def __init__(self, model: Any, model_id: str, default_max_tokens: int, *,
                 table: ModelTable | None = None) -> None:
        # ``model``/``model_id``: the default model (a request without ``model``; /tokenize, /ready's name).
        # ``table``: every served model by name, when there are several.
        self.table = table or ModelTable([Served(model_id, "chat", model)])
        self.model = model
        self.model_id = model_id
        self.default_max_tokens = default_max_tokens
        self._fanout_failing = False

    # ---- small routes --------------------------------------------------------------------------------------

    async def replica_infos(self, served: Served | None = None) -> dict[str, ModelInfo]:
        """Every replica's info of one model's deployment (the default model's), by replica id; {} when Serve's
        controller cannot list them."""
        s = served or self.table.default
        if s.replicas is None:
            return {}
        try:
            infos = await asyncio.wait_for(s.replicas.infos(), INFO_TIMEOUT_S)
        except Exception as e:  # no controller, or Ray's API changed: one replica's view is still an answer
            # Once per failure spell: readiness probes and the RunPod worker ask every half second.
            (log.debug if self._fanout_failing else log.warning)(
                "cannot reach every model replica (%s); reporting the one a call reaches", type(e).__name__)
            self._fanout_failing = True
            return {}
        self._fanout_failing = False
        return infos

    async def _views(self) -> list[tuple[ModelInfo, dict[str, ModelInfo]]]:
        """Per served model: every replica together (``replicas.combine``), and each replica's own info."""
        async def one(s: Served) -> tuple[ModelInfo, dict[str, ModelInfo]]:
            infos = await self.replica_infos(s)
            return (combine(list(infos.values())) if infos else await self._info(s.handle)), infos

        return list(await asyncio.gather(*(one(s) for _, s in self.table.groups())))

    async def info(self) -> ModelInfo:
        """Every replica of every served model together: one model's replicas summed (``replicas.combine``); several
        models summed again, ready when all are (``merge_infos``)."""
        return merge_infos([combined for combined, _ in await self._views()])

    async def stats(self) -> dict[str, Any]:
        """``/stats``: everything together (summed), and each replica of each model under ``replicas``."""
        views = await self._views()
        each = [{"model": name, "replica": rid, **i.model_dump(exclude={"detail"})}
                for (name, _), (_, infos) in zip(self.table.groups(), views, strict=True)
                for rid, i in sorted(infos.items())]
        return {**merge_infos([c for c, _ in views]).model_dump(exclude={"detail"}), "replicas": each}

    async def overview(self) -> tuple[ModelInfo, int]:
        """``info()`` and how many model replicas answered (0: the controller could not be asked), from one
        round of calls."""
        views = await self._views()
        return merge_infos([c for c, _ in views]), sum(len(infos) for _, infos in views)

    async def _info(self, handle: Any) -> ModelInfo:
        # While a model deployment has no live replica (restarting after a crash) a handle call waits for one; a
        # readiness probe must get its 503 quickly instead.
        try:
            info: ModelInfo = await asyncio.wait_for(_call(handle.info.remote()), INFO_TIMEOUT_S)
            return info
        except TimeoutError:
            raise NotReadyError(f"the model server did not answer within {INFO_TIMEOUT_S:.0f} s (restarting?)") \
                from None

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [model_card(s.name, {"kind": s.kind} if len(self.table.served) > 1
                                                      else None) for s in self.table.served]}

    async def embeddings(self, body: Any, request_id: str | None = None) -> dict[str, Any]:
        req: EmbeddingRequest = parse(EmbeddingRequest, body)
        target = self.table.pick(req.model, "embedding")
        call = EmbedCall(inputs=req.inputs())
        out: Embeddings = raise_if_error(await _call(call_with_failover(lambda: target.handle.embed.remote(call),
                                                                        request_id or "embeddings")))
        return embedding_response(target.name, out, req.encoding_format, req.dimensions)

    async def tokenize(self, body: Any) -> dict[str, Any]:
        req: TokenizeRequest = parse(TokenizeRequest, body)
        if req.messages is not None:
            call = TokenizeCall(messages=chat_messages(req.messages), add_special=req.add_special)
        else:
            call = TokenizeCall(text=req.content if req.content is not None else req.prompt,
                                add_special=req.add_special)
        model = self.table.pick(_named(req), "chat").handle
        return raise_if_error(await _call(model.tokenize.remote(call))).model_dump()

    async def detokenize(self, body: Any) -> dict[str, Any]:
        req: DetokenizeRequest = parse(DetokenizeRequest, body)
        call = DetokenizeCall(tokens=tuple(req.tokens))
        model = self.table.pick(_named(req), "chat").handle
        return raise_if_error(await _call(model.detokenize.remote(call))).model_dump()

    # ---- generation ----------------------------------------------------------------------------------------

    async def chat(self, body: Any, request_id: str | None = None) -> Reply:
        req: ChatCompletionRequest = parse(ChatCompletionRequest, body)
        target = self.table.pick(req.model, "chat")
        gen = GenerateRequest(label=request_id or response_id(CHAT), messages=chat_messages(req.messages),
                              params=req.to_sampling_params(self.default_max_tokens), stream=req.stream,
                              **tool_fields(req))
        return await self._run(gen, chat=True, include_usage=req.include_usage, target=target)

    async def completions(self, body: Any, request_id: str | None = None) -> Reply:
        req: CompletionRequest = parse(CompletionRequest, body)
        target = self.table.pick(req.model, "chat")
        prompt = req.prompt_value()
        gen = GenerateRequest(label=request_id or response_id(COMPLETIONS),
                              prompt=tuple(prompt) if isinstance(prompt, list) else prompt,
                              params=req.to_sampling_params(self.default_max_tokens), stream=req.stream)
        return await self._run(gen, chat=False, include_usage=req.include_usage, target=target)

    async def _run(self, req: GenerateRequest, *, chat: bool, include_usage: bool, target: Served) -> Reply:
        model = target.handle
        # Not started yet: a replica lost now costs a resend to another one, not the request (failover).
        if not req.stream:
            done: Done = raise_if_error(await _call(call_with_failover(lambda: model.complete.remote(req),
                                                                       req.label)))
            return self._full_response(req.label, done, chat, target.name)
        try:
            gen, first = await _call(open_stream(lambda: model.options(stream=True).generate.remote(req),
                                                 req.label))
        except StopAsyncIteration:
            raise NotReadyError("the model closed the stream before it started") from None
        if isinstance(first, ErrorEvent):
            gen.cancel()
            raise first.error
        return EventStream(gen, first, ChunkMaker(req.label, target.name, now(), chat), include_usage)

    def _full_response(self, rid: str, done: Done, chat: bool, model_id: str) -> dict[str, Any]:
        text = done.text or ""
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": chat_message(done),
                                      "logprobs": chat_logprobs(done.logprobs), "finish_reason": done.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": completion_logprobs(done.logprobs),
                      "finish_reason": done.finish_reason}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now(),
                "model": model_id, "choices": [choice], "usage": openai_usage(done.usage),
                "timings": done.timings.model_dump()}


def _named(req: BaseModel) -> str | None:
    """The ``model`` a /tokenize or /detokenize body names (an extra field there), if any."""
    name = (req.model_extra or {}).get("model")
    return name if isinstance(name, str) else None

