"""LlamaModel's loading and readiness without Ray or a model: loading -> ready | failed, heal once, permanent
failures stay failed without restarts, a dead engine is failed and unhealthy, client-safe ``/ready`` reasons, and
close frees what was loaded. The engine and the model are fakes (``tests/support/fake_model.py``)."""

from __future__ import annotations

from typing import Any

import pytest

from serve_app.errors import (
    EngineDeadError,
    GatedRepoError,
    HubUnreachableError,
    LocalFileNotFoundError,
    ModelLoadError,
    NotReadyError,
    RepoNotFoundError,
    RevisionNotFoundError,
)
from serve_app.model.service import ModelService
from serve_app.protocol import (
    ErrorEvent,
    GenerateRequest,
    TokenizeCall,
)
from tests.support.fake_model import Harness, run


async def svc_complete(svc: ModelService, req: GenerateRequest) -> Any:
    return await svc.complete(req)


def test_not_ready_while_loading() -> None:
    async def main() -> None:
        h = Harness()
        out = await svc_complete(h.service, GenerateRequest(label="r", prompt="x"))
        assert isinstance(out, ErrorEvent) and isinstance(out.error, NotReadyError)
        tok = await h.service.tokenize(TokenizeCall(text="x"))
        assert isinstance(tok, ErrorEvent) and isinstance(tok.error, NotReadyError)

    run(main())


def test_unloadable_file_is_healed_once() -> None:
    async def main() -> None:
        h = Harness(load_errors=[ModelLoadError("bad magic")])
        svc = await h.ready()
        assert svc.loader.state == "ready" and h.fetches == ["ensure", "heal"] and len(h.loads) == 2

    run(main())


def test_file_still_unloadable_after_healing_fails_without_restarts() -> None:
    async def main() -> None:
        h = Harness(load_errors=[ModelLoadError("bad"), ModelLoadError("bad")])
        svc = await h.ready()
        assert svc.loader.state == "failed" and svc.loader.reason.startswith("model_load_failed: ")
        assert h.fetches == ["ensure", "heal"] and svc.health_problem() is None

    run(main())


@pytest.mark.parametrize("err", [RepoNotFoundError("repo x"), GatedRepoError("gated"),
                                 RevisionNotFoundError("rev"), LocalFileNotFoundError("no file")])
def test_permanent_source_errors_fail_once_and_keep_the_replica(err: Exception) -> None:
    async def main() -> None:
        h = Harness(fetch_errors=[err])
        svc = await h.ready()
        info = await svc.info()
        assert info.state == "failed" and info.reason.startswith(f"{err.code}: ")  # type: ignore[attr-defined]
        assert svc.health_problem() is None  # a restart would fail the same way: no restart loop
        assert h.fetches == ["ensure"] and h.loads == []

    run(main())


def test_retryable_source_error_asks_for_a_restart() -> None:
    async def main() -> None:
        svc = await Harness(fetch_errors=[HubUnreachableError("timeout")]).ready()
        assert svc.loader.state == "failed" and svc.health_problem() is not None

    run(main())


def test_ready_reason_has_no_paths_or_exception_text() -> None:
    async def main() -> None:
        secret = "/home/alice/private-models/secret.gguf"
        svc = await Harness(fetch_errors=[LocalFileNotFoundError(f"Local model file {secret!r} does not exist")]).ready()
        reason = (await svc.info()).reason or ""
        assert reason.startswith("local_file_not_found: ") and "/" not in reason and "secret" not in reason
        svc2 = await Harness(load_errors=[RuntimeError(f"boom at {secret}")]).ready()
        reason2 = (await svc2.info()).reason or ""
        assert svc2.loader.state == "failed" and "boom" not in reason2 and "/" not in reason2
        assert svc2.health_problem() is not None  # unexpected errors: let Ray Serve try a fresh replica

    run(main())


def test_dead_engine_means_failed_and_unhealthy() -> None:
    async def main() -> None:
        h = Harness()
        svc = await h.ready()
        assert svc.health_problem() is None
        h.engine.dead = "RuntimeError: CUDA error at /src/ggml.c:123"
        info = await svc.info()
        assert info.state == "failed" and info.reason == "engine_dead: the engine stopped; the replica restarts"
        assert svc.health_problem() is not None
        out = await svc.complete(GenerateRequest(label="r", prompt="x"))
        assert isinstance(out, ErrorEvent) and isinstance(out.error, EngineDeadError)

    run(main())


def test_close_shuts_the_engine_and_frees_the_model() -> None:
    async def main() -> None:
        h = Harness()
        svc = await h.ready()
        svc.close()
        assert h.engine.dead == "shut down" and h.vocab.closed

    run(main())
