"""A streamed generation as OpenAI SSE chunks (chat or text completion), ending with ``data: [DONE]``.

``EventStream`` owns the model's response generator: ``close()`` cancels it unless the generation finished, and
whoever holds the stream (the HTTP reply, the handle API) calls it when done, so a client that leaves at any point,
even before the first chunk went out, frees its slot at once.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from serve_app.errors import EngineDeadError
from serve_app.protocol import Delta, Done, ErrorEvent, Event, TokenLogprob, openai_usage
from serve_app.ray_errors import ray_failure

from .logprobs import chat_logprobs, completion_logprobs
from .replies import DONE, internal_error, sse, sse_error
from .tools import call_deltas

log = logging.getLogger("ray.serve")


class ChunkMaker:
    """The OpenAI chunk dicts of one response: same id, object, created time and model on each."""

    def __init__(self, rid: str, model: str, created: int, chat: bool) -> None:
        self.chat = chat
        self.head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": created, "model": model}
        self.text_offset = 0  # completions' logprobs.text_offset runs over the whole output

    def choice(self, text: str | None, finish: str | None, lps: list[TokenLogprob] | None = None,
               **extra: Any) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            c: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": chat_logprobs(lps), "finish_reason": finish}
        else:
            logprobs = completion_logprobs(lps, self.text_offset)
            self.text_offset += sum(len(lp.token) for lp in lps or ())
            c = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        return {**self.head, "choices": [c], **extra}

    def delta(self, ev: Delta) -> dict[str, Any]:
        """A chunk of text, or, in a chat, of content, reasoning and tool calls."""
        if not self.chat or (not ev.reasoning and not ev.tool_calls):
            return self.choice(ev.text, None, ev.logprobs)
        chunk = self.choice(ev.text or None, None, ev.logprobs)
        delta = chunk["choices"][0]["delta"]
        if ev.reasoning:
            delta["reasoning_content"] = ev.reasoning
        if ev.tool_calls:
            delta["tool_calls"] = call_deltas(ev.tool_calls)
        return chunk

    def role(self) -> dict[str, Any]:
        return {**self.head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]}

    def usage(self, done: Done) -> dict[str, Any]:
        return {**self.head, "choices": [], "usage": openai_usage(done.usage)}


class EventStream:
    def __init__(self, gen: Any, first: Event, chunks: ChunkMaker, include_usage: bool) -> None:
        self.gen = gen
        self.first = first
        self.chunks = chunks
        self.include_usage = include_usage
        self.finished = False

    async def __aiter__(self) -> AsyncIterator[str]:
        if self.chunks.chat:
            yield sse(self.chunks.role())
        ev: Event | None = self.first
        while ev is not None:
            if isinstance(ev, Delta):
                if ev.text or ev.logprobs or ev.reasoning or ev.tool_calls:
                    yield sse(self.chunks.delta(ev))
            elif isinstance(ev, Done):
                yield sse(self.chunks.choice(None, ev.finish_reason, timings=ev.timings.model_dump()))
                if self.include_usage:
                    yield sse(self.chunks.usage(ev))
                break
            else:
                yield sse_error(ev.error)
                break
            ev = await self._next_event()
        self.finished = True
        yield DONE

    def close(self) -> None:
        if not self.finished:  # the client went away: stop generating (frees the slot within one step)
            self.finished = True
            self.gen.cancel()

    async def _next_event(self) -> Event | None:
        """The next event, or an ``ErrorEvent`` when the stream itself broke (the model's replica died
        mid-generation): the client gets an error chunk and ``[DONE]``, as from vLLM, not a cut connection."""
        try:
            ev: Event | None = await anext(self.gen, None)
            if ev is None:  # the model's stream ended without its last event: never pass that off as a success
                return ErrorEvent(EngineDeadError("the model's stream ended early; retry"))
            return ev
        except Exception as e:
            typed = ray_failure(e)
            return ErrorEvent(typed if typed is not None else internal_error(e, self.chunks.head["id"]))

