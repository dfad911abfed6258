"""Engine faults end cleanly: a lone request the KV cache can never hold gets a retryable 503-class error (never a
500 or a hang), a shutdown that times out never frees what the still-running engine thread can touch, and an engine
thread that dies always marks the engine dead, fails its streams and refuses new ones; a request that cannot even
start fails alone; a stop string too long to match cheaply is refused up front."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from serve_app.config import EngineConfig
from serve_app.engine import EngineRequest, load_engine, open_stream
from serve_app.errors import EngineDeadError
from serve_app.protocol import Delta, Done, ErrorEvent, Event, SamplingParams

pytestmark = pytest.mark.timeout(120)

PROMPT = "the quick brown fox jumps over the lazy dog"


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


class NoKvRoom:
    """A real context whose ``llama_decode`` answers 1 (no KV slot for the batch), as a full KV pool does."""

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx

    def decode(self, batch: Any) -> int:
        return 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


def test_lone_request_that_never_fits_the_kv_gets_a_retryable_503(tiny_model: Path) -> None:
    eng, model, _ = load_engine(str(tiny_model), EngineConfig(n_parallel=2, n_ctx_per_slot=64, kv_unified=True),
                                want_gpu=False)
    real = eng.ctx
    try:
        eng.ctx = NoKvRoom(real)

        async def main() -> Event:
            s = open_stream(eng, "big", model.tokenize(PROMPT, True, False), greedy(8))
            return [ev async for ev in s.events()][-1]

        last = asyncio.run(asyncio.wait_for(main(), 20))
        assert isinstance(last, ErrorEvent), last
        assert last.error.retryable and last.error.status == 503, (last.error.code, last.error.status)
        assert eng.stats().slots_busy == 0 and not eng.dead
    finally:
        eng.ctx = real
        eng.shutdown()


def test_shutdown_that_times_out_frees_nothing_the_engine_thread_can_touch(tiny_model: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    eng, model, _ = load_engine(str(tiny_model), EngineConfig(n_parallel=1, n_ctx_per_slot=128), want_gpu=False)
    inside, release = threading.Event(), threading.Event()

    def emit(ev: Event) -> None:  # runs on the engine thread: holds it inside a step
        if isinstance(ev, Delta):
            inside.set()
            release.wait(30)

    thread = eng._thread
    try:
        eng.submit([EngineRequest("slow", model.tokenize(PROMPT, True, False), greedy(50), emit)])
        assert inside.wait(10)
        with caplog.at_level(logging.WARNING, logger="serve_app.engine"):
            eng.shutdown(timeout=0.2)
            model.close()
        assert thread.is_alive()
        assert eng.ctx.ptr is not None, "the context was freed under a running engine thread"
        assert model.ptr is not None, "the model was freed under a running engine thread"
        assert any("still running" in r.getMessage() for r in caplog.records)
    finally:
        release.set()
    thread.join(10)
    assert not thread.is_alive()
    # The engine thread itself released them on its way out.
    assert eng.ctx.ptr is None and model.ptr is None
    assert eng.dead


def test_engine_thread_death_marks_the_engine_dead_and_fails_open_streams(tiny_model: Path) -> None:
    eng, model, _ = load_engine(str(tiny_model), EngineConfig(n_parallel=1, n_ctx_per_slot=128), want_gpu=False)
    try:
        async def main() -> list[Event]:
            s = open_stream(eng, "victim", model.tokenize(PROMPT, True, False), greedy(200))
            eng._inject_fault(RuntimeError("injected fault"))
            return [ev async for ev in s.events()]

        events = asyncio.run(asyncio.wait_for(main(), 20))
        assert isinstance(events[-1], ErrorEvent) and events[-1].error.code == "engine_dead"
        for _ in range(200):
            if eng.dead:
                break
            time.sleep(0.01)
        assert eng.dead and "injected fault" in eng.dead
        assert not isinstance(events[-1], Done)

        async def after() -> None:
            with pytest.raises(EngineDeadError):  # refused at once, never queued behind a dead thread
                open_stream(eng, "late", model.tokenize(PROMPT, True, False), greedy(4))

        asyncio.run(after())
    finally:
        eng.shutdown()


def test_a_request_that_cannot_start_fails_alone(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import serve_app.engine.llama as llama

    eng, model, _ = load_engine(str(tiny_model), EngineConfig(n_parallel=2, n_ctx_per_slot=128), want_gpu=False)

    def refuse(*_a: Any, **_k: Any) -> None:
        raise MemoryError("no sampler")

    try:
        monkeypatch.setattr(llama.SamplerChain, "__init__", refuse)

        async def main() -> tuple[Event, Event]:
            sampled = open_stream(eng, "sampled", model.tokenize(PROMPT, True, False),
                                  SamplingParams(max_tokens=4, temperature=0.8, seed=1))
            plain = open_stream(eng, "plain", model.tokenize(PROMPT, True, False), greedy(4))
            return [ev async for ev in sampled.events()][-1], [ev async for ev in plain.events()][-1]

        failed, fine = asyncio.run(asyncio.wait_for(main(), 20))
        assert isinstance(failed, ErrorEvent) and isinstance(fine, Done)
        assert not eng.dead and eng.stats().slots_busy == 0 and eng.stats().waiting == 0
    finally:
        eng.shutdown()


def test_an_oversized_stop_string_is_refused_before_any_work() -> None:
    from pydantic import ValidationError

    from serve_app.errors import invalid_request
    from serve_app.protocol import MAX_STOP_CHARS
    from serve_app.schemas import CompletionRequest

    # A stop string's matcher costs time linear in its length on the engine thread: the request is refused at
    # validation, before it reaches any engine (and SamplingParams itself cannot carry one).
    body = {"prompt": "hi", "max_tokens": 4, "stop": ["x" * (MAX_STOP_CHARS + 1)]}
    with pytest.raises(ValidationError) as caught:
        CompletionRequest.model_validate(body)
    err = invalid_request(caught.value)
    assert err.status == 400 and err.param == "stop" and str(MAX_STOP_CHARS) in err.message
    with pytest.raises(ValidationError):
        SamplingParams(max_tokens=4, temperature=0, stop=("x" * (MAX_STOP_CHARS + 1),))
    assert SamplingParams(stop=("x" * MAX_STOP_CHARS,)).stop  # the limit itself is fine
