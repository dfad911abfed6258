"""The ModelCache deployment's contract across the Ray boundary: results are plain dicts, every failure is returned
as ``{"error": ...}`` that ``unwrap`` turns back into the same typed error, and blocking work never runs on the
event loop. Exercised on the deployment's class directly (no Ray cluster needed for the contract).
"""

from __future__ import annotations

import asyncio
import os
import pickle
from pathlib import Path
from typing import Any

import pytest

from serve_app.cache.deployment import ModelCache
from serve_app.cache.reply import error_reply, is_error, unwrap
from serve_app.errors import InvalidModelReferenceError, RepoNotFoundError, ServeError
from tests.support.fake_hub import FakeHub

pytestmark = pytest.mark.timeout(60)

REPO = "acme/tiny-GGUF"




def make_cache(tmp_path: Path) -> Any:
    cls = ModelCache.func_or_class
    return cls(str(tmp_path / "vol"), {"max_attempts": 1, "backoff_base_s": 0.01})


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_methods_return_plain_dicts(fhub: FakeHub, tmp_path: Path) -> None:
    sha = fhub.add_file(REPO, "m.gguf", os.urandom(100_000))
    cache = make_cache(tmp_path)
    ref = {"repo_id": REPO, "filename": "m.gguf"}
    got = unwrap(run(cache.ensure(ref)))
    assert got["sha256"] == sha and os.path.isfile(got["path"])
    assert unwrap(run(cache.status(ref)))["state"] == "present"
    assert unwrap(run(cache.verify(ref)))["state"] == "present"
    assert unwrap(run(cache.heal(ref)))["path"] == got["path"]
    assert [f["filename"] for f in unwrap(run(cache.list()))] == ["m.gguf"]
    assert unwrap(run(cache.invalidate(ref))) is None
    assert unwrap(run(cache.status(ref)))["state"] == "missing"
    pickle.dumps(got)  # what Ray ships must be plain data


def test_errors_come_back_as_values_and_unwrap_to_typed_errors(fhub: FakeHub, tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    reply = run(cache.ensure({"repo_id": "acme/nope", "filename": "m.gguf"}))
    assert is_error(reply) and reply["error"]["code"] == "repo_not_found"
    with pytest.raises(RepoNotFoundError):
        unwrap(reply)
    bad = run(cache.ensure({"repo_id": REPO, "filename": "m.gguf", "typo": 1}))
    with pytest.raises(InvalidModelReferenceError):
        unwrap(bad)


def test_unexpected_exceptions_become_internal_errors() -> None:
    reply = error_reply(RuntimeError("boom"))
    with pytest.raises(ServeError, match="RuntimeError: boom") as info:
        unwrap(reply)
    assert info.value.code == "internal_error"
    assert unwrap({"state": "present"}) == {"state": "present"}


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
        unwrap(await cache.ensure({"repo_id": REPO, "filename": "m.gguf"}))
        task.cancel()
        return ticks

    assert run(scenario()) >= 10
