"""asyncio side of the engine: per-request event streams fed from the engine thread."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from serve_app.schemas import SamplingParams

from .core import Delta, Engine, EngineRequest, Event, Failed, Finished


class RequestStream:
    """Events of one request. Closing it before the end cancels the request (its slot frees within one step).

    Deltas that pile up while the consumer is busy are merged, so a slow consumer (a Ray stream, an HTTP client)
    gets fewer, larger chunks instead of falling behind.
    """

    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        self._loop = asyncio.get_running_loop()
        self._q: asyncio.Queue[Event] = asyncio.Queue()
        self.request = EngineRequest(id=request_id, prompt=prompt, params=params, emit=self._emit)
        self.done = False
        self._engine: Engine | None = None

    def _emit(self, ev: Event) -> None:
        self._loop.call_soon_threadsafe(self._q.put_nowait, ev)

    def bind(self, engine: Engine) -> None:
        self._engine = engine

    async def events(self) -> AsyncIterator[Event]:
        try:
            while True:
                ev = await self._q.get()
                if isinstance(ev, Delta):
                    text, n = [ev.text], ev.n_tokens
                    while not self._q.empty() and isinstance(nxt := self._q._queue[0], Delta):  # type: ignore[attr-defined]
                        self._q.get_nowait()
                        text.append(nxt.text)
                        n += nxt.n_tokens
                    yield Delta("".join(text), n)
                    continue
                self.done = isinstance(ev, Finished | Failed)
                yield ev
                if self.done:
                    return
        finally:
            self.close()

    def close(self) -> None:
        if not self.done and self._engine is not None:
            self.done = True
            self._engine.cancel(self.request.id)


def open_stream(engine: Engine, request_id: str, prompt: list[int], params: SamplingParams) -> RequestStream:
    """Submit one request and return its stream (raises typed errors before any work)."""
    stream = RequestStream(request_id, prompt, params)
    engine.submit([stream.request])
    stream.bind(engine)
    return stream
