"""The ModelCache deployment's contract across the Ray boundary: results are the typed result models
(``CachedFile``, ``CacheStatus``), every failure is returned as an ``ErrorEvent`` that ``raise_if_error`` turns back
into the same typed error, and blocking work never runs on the event loop. Exercised on the deployment's class
directly (no Ray cluster needed for the contract).
"""

from __future__ import annotations

import asyncio
import os
import pickle
from pathlib import Path
from typing import Any

import pytest

from serve_app.cache import CachedFile, CacheStatus
from serve_app.cache.deployment import ModelCache
from serve_app.errors import InvalidModelReferenceError, RepoNotFoundError, ServeError
from serve_app.protocol import ErrorEvent, raise_if_error
from tests.support.fake_hub import FakeHub

pytestmark = pytest.mark.timeout(60)

REPO = "acme/tiny-GGUF"


def make_cache(tmp_path: Path) -> Any:
    cls = ModelCache.func_or_class
    return cls(str(tmp_path / "vol"), {"max_attempts": 1, "backoff_base_s": 0.01})


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_methods_return_typed_results(fhub: FakeHub, tmp_path: Path) -> None:
    sha = fhub.add_file(REPO, "m.gguf", os.urandom(100_000))
    cache = make_cache(tmp_path)
    ref = {"repo_id": REPO, "filename": "m.gguf"}
    got = raise_if_error(run(cache.ensure(ref)))
    assert isinstance(got, CachedFile)
    assert got.sha256 == sha and os.path.isfile(got.path)
    status = raise_if_error(run(cache.status(ref)))
    assert isinstance(status, CacheStatus) and status.state == "present"
    assert raise_if_error(run(cache.verify(ref))).state == "present"
    assert raise_if_error(run(cache.heal(ref))).path == got.path
    assert [f.filename for f in raise_if_error(run(cache.list()))] == ["m.gguf"]
    assert raise_if_error(run(cache.invalidate(ref))) is None
    assert raise_if_error(run(cache.status(ref))).state == "missing"
    assert pickle.loads(pickle.dumps(got)) == got  # what Ray ships must survive pickling unchanged


def test_errors_come_back_as_values_and_unwrap_to_typed_errors(fhub: FakeHub, tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    reply = run(cache.ensure({"repo_id": "acme/nope", "filename": "m.gguf"}))
    assert isinstance(reply, ErrorEvent) and reply.error.code == "repo_not_found"
    assert isinstance(pickle.loads(pickle.dumps(reply)).error, RepoNotFoundError)
    with pytest.raises(RepoNotFoundError):
        raise_if_error(reply)
    bad = run(cache.ensure({"repo_id": REPO, "filename": "m.gguf", "typo": 1}))
    with pytest.raises(InvalidModelReferenceError, match="typo"):
        raise_if_error(bad)


def test_unexpected_exceptions_become_internal_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = make_cache(tmp_path)

    def boom() -> list[CachedFile]:
        raise RuntimeError("boom")

    monkeypatch.setattr(cache._store, "list", boom)
    reply = run(cache.list())
    assert isinstance(reply, ErrorEvent)
    with pytest.raises(ServeError, match="RuntimeError: boom") as info:
        raise_if_error(reply)
    assert info.value.code == "internal_error"
    present = CacheStatus(state="present", repo_id=REPO, filename="m.gguf", revision="main")
    assert raise_if_error(present) is present


def test_blocking_work_leaves_the_event_loop_free(fhub: FakeHub, tmp_path: Path) -> None:
    fhub.add_file(REPO, "m.gguf", os.urandom(200_000))
    fhub.set_fault("stall", count=1, seconds=0.5, after_bytes=50_000)
    cache = make_cache(tmp_path)

    async def scenario() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        task = asyncio.create_task(ticker())
        raise_if_error(await cache.ensure({"repo_id": REPO, "filename": "m.gguf"}))
        task.cancel()
        return ticks

    assert run(scenario()) >= 10
