"""Invariant: unloading a model of the on-demand pool never breaks a stream mid-way without saying so and never frees
an engine under a running request. An evicted model takes no new calls; a stream that finishes within the grace
period finishes normally (every token, ``finish_reason`` length) before the model is freed; one still running when
the grace period ends stops with the retryable ``model_unloaded`` error; afterwards the engine is gone. A replica
reports ``failed`` only when it holds nothing and its loads failed. Ray Serve's multiplexer evicts by calling
``__del__`` on a worker thread and waiting for it: that call returns only once the model is retired.

A real llama.cpp engine (``ModelService`` on a small written GGUF), without Ray: the pool's Ray side is covered by
test_model_pool.py.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from serve_app.cache.results import CachedFile
from serve_app.config import AppArgs
from serve_app.model.pool import PoolState, Resident
from serve_app.model.service import ModelService
from serve_app.protocol import Delta, Done, ErrorEvent, GenerateRequest, SamplingParams, TokenizeCall
from tests.support.gguf_factory import ModelSpec, write_gguf

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    # Slow enough that a long stream is still running when the test acts on it, small enough to load at once.
    spec = ModelSpec(n_layer=4, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, name="pool-evict")
    return write_gguf(tmp_path_factory.mktemp("pool") / "pool-evict.gguf", spec)


def fetch_for(path: str) -> Any:
    async def fetch(method: str, ref: dict[str, Any]) -> CachedFile:
        return CachedFile(repo_id="local", filename=Path(path).name, revision="main", commit="c" * 40, path=path,
                          size=Path(path).stat().st_size, sha256="ab" * 32, verified_at="now", parts=[path])
    return fetch


async def resident(path: str, grace_s: float, pool: PoolState) -> Resident:
    args = AppArgs.model_validate({"model": {"filename": path}, "cache_dir": str(Path(path).parent),
                                   "engine": {"n_parallel": 2, "n_ctx_per_slot": 4096, "n_threads": 1}})
    service = ModelService(args, fetch_for(path), use_gpu=False, gauges=False)
    await service.load()
    r = Resident("m", service, asyncio.get_running_loop(), grace_s, pool.gone)
    pool.touch(r)
    return r


def request(tokens: int) -> GenerateRequest:
    return GenerateRequest(label="t", prompt="the quick brown fox", stream=True,
                           params=SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))


async def consume(gen: Any, first: asyncio.Event) -> tuple[int, Any, float]:
    n, last = 0, None
    async for ev in gen:
        if isinstance(ev, Delta):
            n += ev.n_tokens
            first.set()
        else:
            last = ev
    return n, last, time.perf_counter()


def test_a_stream_within_the_grace_period_finishes_before_the_model_is_freed(model_path: str) -> None:
    async def run() -> None:
        pool = PoolState("LlamaModel", ["m"])
        r = await resident(model_path, 30.0, pool)
        first = asyncio.Event()
        task = asyncio.create_task(consume(r.generate(lambda s: s.generate(request(300))), first))
        await first.wait()
        await r.retire()
        retired_at = time.perf_counter()
        n, last, ended_at = await task
        assert n == 300 and isinstance(last, Done) and last.finish_reason == "length"
        assert ended_at <= retired_at  # freed only after the stream ended
        assert r.closed and r.service.loader.loaded is None and pool.live() == []
        refused = await r.call(lambda s: s.tokenize(TokenizeCall(text="hi")))
        assert isinstance(refused, ErrorEvent) and refused.error.code == "model_unloaded"

    asyncio.run(run())


def test_a_stream_past_the_grace_period_ends_with_a_retryable_model_unloaded_error(model_path: str) -> None:
    async def run() -> None:
        pool = PoolState("LlamaModel", ["m"])
        r = await resident(model_path, 0.2, pool)
        first = asyncio.Event()
        task = asyncio.create_task(consume(r.generate(lambda s: s.generate(request(3500))), first))
        await first.wait()
        t0 = time.perf_counter()
        await r.retire()
        n, last, _ = await asyncio.wait_for(task, 10)
        assert time.perf_counter() - t0 < 8
        assert 0 < n < 3500
        assert isinstance(last, ErrorEvent) and last.error.code == "model_unloaded" and last.error.retryable
        assert r.service.loader.loaded is None and pool.live() == []

    asyncio.run(run())


def test_ray_serves_eviction_call_blocks_until_the_model_is_retired(model_path: str) -> None:
    async def run() -> None:
        pool = PoolState("LlamaModel", ["m"])
        r = await resident(model_path, 30.0, pool)
        first = asyncio.Event()
        task = asyncio.create_task(consume(r.generate(lambda s: s.generate(request(200))), first))
        await first.wait()
        # What Ray Serve's multiplexer does with a sync __del__ of an evicted model.
        await asyncio.get_running_loop().run_in_executor(None, r.__del__)
        assert r.closed and task.done()
        n, last, _ = task.result()
        assert n == 200 and isinstance(last, Done)
        r.__del__()  # garbage collection later: nothing left to do, nothing raised

    asyncio.run(run())


def test_a_replica_is_ready_while_it_holds_or_can_load_a_model_and_failed_when_nothing_loads(model_path: str) -> None:
    async def run() -> None:
        pool = PoolState("LlamaModel", ["m", "bad"])
        assert (await pool.info()).state == "loading"  # preloading
        pool.preloading = False
        assert (await pool.info()).state == "ready"  # nothing held yet, nothing failed: a request loads one
        pool.failures["bad"] = "local_file_not_found: the local model file was not found"
        info = await pool.info()
        assert info.state == "failed" and info.reason and info.reason.startswith("bad: local_file_not_found")
        r = await resident(model_path, 1.0, pool)
        info = await pool.info()
        assert info.state == "ready" and info.loaded_models == ["m"] and info.slots_total == 2
        await r.retire()

    asyncio.run(run())
