"""asyncio side of the engine: per-request event streams fed from the engine thread."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from serve_app.protocol import Delta, Done, ErrorEvent, Event, SamplingParams

from .generation import EngineRequest

if TYPE_CHECKING:
    from .grammar import GrammarSampler
    from .scheduler import Engine


class _LoopSink:
    """Collects events from engine threads and hands them to one event loop in one wake-up per step.

    Usually one engine thread feeds a loop, but nothing stops two engines in one process from sharing it, so the
    pending list is swapped under a lock (an uncontended acquire per event is cheap next to a decode step)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # A weak reference: the sink is the value of a WeakKeyDictionary keyed by this loop, and a strong one would
        # keep every closed loop (one per asyncio.run) alive for good.
        self._loop = weakref.ref(loop)
        self._lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue[Event], Event]] = []
        # One bound method shared by every request of this loop: the engine dedups flushes by identity.
        self.flush_once = self.flush

    def put(self, q: asyncio.Queue[Event], ev: Event) -> None:
        with self._lock:
            self.pending.append((q, ev))

    def flush(self) -> None:
        with self._lock:
            if not self.pending:
                return
            batch, self.pending = self.pending, []
        loop = self._loop()
        if loop is None:
            return  # the loop is gone: nobody is left to read these events
        try:
            loop.call_soon_threadsafe(self._deliver, batch)
        except RuntimeError:
            pass  # the loop is closed: nobody is left to read these events

    @staticmethod
    def _deliver(batch: list[tuple[asyncio.Queue[Event], Event]]) -> None:
        for q, ev in batch:
            q.put_nowait(ev)


_sinks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopSink] = weakref.WeakKeyDictionary()


def _sink_for(loop: asyncio.AbstractEventLoop) -> _LoopSink:
    sink = _sinks.get(loop)
    if sink is None:
        sink = _sinks[loop] = _LoopSink(loop)
    return sink


class RequestStream:
    """Events of one request. Closing it before the end cancels the request (its slot frees within one step), also
    when it is closed before ``bind``: the cancel is then sent at ``bind``.

    Deltas that pile up while the consumer is busy are merged, so a slow consumer (a Ray stream, an HTTP client)
    gets fewer, larger chunks instead of falling behind.
    """

    def __init__(self, label: str, prompt: list[int], params: SamplingParams, stream: bool = True,
                 grammar: GrammarSampler | None = None) -> None:
        self._sink = _sink_for(asyncio.get_running_loop())
        self._q: asyncio.Queue[Event] = asyncio.Queue()
        self.request = EngineRequest(label=label, prompt=prompt, params=params, emit=self._emit, stream=stream,
                                     flush=self._sink.flush_once, grammar=grammar)
        self.done = False
        self._closed = False
        self._engine: Engine | None = None

    def _emit(self, ev: Event) -> None:
        self._sink.put(self._q, ev)

    def bind(self, engine: Engine) -> None:
        """Attach the engine the request was submitted to (the one ``close`` cancels it on)."""
        self._engine = engine
        if self._closed and not self.done:
            self.done = True
            engine.cancel(self.request.key)

    async def events(self) -> AsyncIterator[Event]:
        try:
            while True:
                ev = await self._q.get()
                if isinstance(ev, Delta):
                    text, n, lps = [ev.text], ev.n_tokens, ev.logprobs
                    while not self._q.empty() and isinstance(nxt := self._q._queue[0], Delta):  # type: ignore[attr-defined]
                        self._q.get_nowait()
                        text.append(nxt.text)
                        n += nxt.n_tokens
                        if nxt.logprobs:
                            lps = [*(lps or []), *nxt.logprobs]
                    yield Delta("".join(text), n, lps)
                    continue
                self.done = isinstance(ev, Done | ErrorEvent)
                yield ev
                if self.done:
                    return
        finally:
            self.close()

    def close(self) -> None:
        self._closed = True
        if not self.done and self._engine is not None:
            self.done = True
            self._engine.cancel(self.request.key)


def open_stream(engine: Engine, label: str, prompt: list[int], params: SamplingParams,
                stream: bool = True, grammar: GrammarSampler | None = None) -> RequestStream:
    """Submit one request and return its stream (raises typed errors before any work)."""
    stream_ = RequestStream(label, prompt, params, stream, grammar)
    engine.submit([stream_.request])
    stream_.bind(engine)
    return stream_
