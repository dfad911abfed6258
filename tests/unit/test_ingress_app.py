"""The HTTP app built from the route table answers every route it lists, and each guard and error path with its
OpenAI-style JSON error: 401 before any route runs (probes stay open), 503 while draining and 429 when the model
is full (both with ``Retry-After``), 404/405 for what the table lacks, a bug as a 500 naming only the request id.
A fake service stands in for LlamaModel: this is the transport's logic; the real graph is tested over HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from serve_app.errors import QueueFullError
from serve_app.ingress.app import build_asgi_app
from serve_app.protocol import ModelInfo
from serve_app.routes import ROUTES


class FakeService:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, Any]] = []
        self.fail: BaseException | None = None

    async def _answer(self, name: str, body: Any = None, rid: Any = None) -> dict[str, Any]:
        self.calls.append((name, body, rid))
        if self.fail is not None:
            raise self.fail
        return {"route": name, "id": rid}

    async def chat(self, body: Any, rid: str) -> dict[str, Any]:
        return await self._answer("chat", body, rid)

    async def completions(self, body: Any, rid: str) -> dict[str, Any]:
        return await self._answer("completions", body, rid)

    async def embeddings(self, body: Any, rid: str) -> dict[str, Any]:
        return await self._answer("embeddings", body, rid)

    async def tokenize(self, body: Any) -> dict[str, Any]:
        return await self._answer("tokenize", body)

    async def detokenize(self, body: Any) -> dict[str, Any]:
        return await self._answer("detokenize", body)

    async def models(self) -> dict[str, Any]:
        return await self._answer("models")

    async def info(self) -> ModelInfo:
        return ModelInfo(state="ready", model="m")

    async def stats(self) -> dict[str, Any]:
        return {**(await self.info()).model_dump(exclude={"detail"}), "replicas": []}


def call(app: Any, method: str, path: str, **kw: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.request(method, path, **kw)

    return asyncio.run(go())


def shape(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code


@pytest.fixture
def svc() -> FakeService:
    return FakeService()


async def fake_scrape() -> bytes:
    return b"ray_gguf_requests_total 1.0\n"


def test_every_table_route_is_served(svc: FakeService) -> None:
    app = build_asgi_app(svc, api_keys=[], max_body_bytes=1 << 20,  # type: ignore[arg-type]
                         scrape_metrics=fake_scrape)
    for r in ROUTES:
        resp = call(app, r.method, r.path, json={"x": 1} if r.method == "POST" else None)
        assert resp.status_code == 200, (r.path, resp.text)
    assert {c[0] for c in svc.calls} == {"chat", "completions", "embeddings", "tokenize", "detokenize", "models"}
    prefixes = {c[0]: c[2].split("-")[0] for c in svc.calls if c[2]}
    assert prefixes == {"chat": "chatcmpl", "completions": "cmpl", "embeddings": "embd"}


def test_request_id_is_used_when_plain_and_replaced_otherwise(svc: FakeService) -> None:
    app = build_asgi_app(svc, api_keys=[], max_body_bytes=1 << 20)  # type: ignore[arg-type]
    r = call(app, "POST", "/v1/completions", json={}, headers={"X-Request-Id": "abc-1"})
    assert r.json()["id"] == "cmpl-abc-1" and "x-request-id" not in r.headers  # the proxy echoes it already
    r = call(app, "POST", "/v1/completions", json={}, headers={"X-Request-Id": "a b" * 100})
    assert r.json()["id"] == f"cmpl-{r.headers['x-request-id']}" and len(r.headers["x-request-id"]) == 32


def test_api_keys_guard_everything_but_probes(svc: FakeService) -> None:
    app = build_asgi_app(svc, api_keys=["k1"], max_body_bytes=1 << 20)  # type: ignore[arg-type]
    shape(call(app, "GET", "/v1/models"), 401, "invalid_api_key")
    shape(call(app, "POST", "/v1/chat/completions", json={}, headers={"Authorization": "Bearer k2"}), 401,
          "invalid_api_key")
    assert call(app, "GET", "/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200
    assert call(app, "GET", "/health").status_code == 200 and call(app, "GET", "/ready").status_code == 200
    assert [c[0] for c in svc.calls] == ["models"]  # refused requests never reached the service


def test_draining_is_a_503_with_retry_after(svc: FakeService) -> None:
    app = build_asgi_app(svc, api_keys=[], max_body_bytes=1 << 20,  # type: ignore[arg-type]
                         is_shutting_down=lambda: True)
    r = call(app, "POST", "/v1/completions", json={})
    shape(r, 503, "shutting_down")
    assert r.headers["retry-after"] and not svc.calls
    ready = call(app, "GET", "/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "shutting_down" and ready.headers["retry-after"]


def test_retry_after_follows_its_one_rule(svc: FakeService) -> None:
    # a refused request may come back after 1 s; /ready, while it is not ready, asks probes to wait 2 s
    draining = build_asgi_app(svc, api_keys=[], max_body_bytes=1 << 20,  # type: ignore[arg-type]
                              is_shutting_down=lambda: True)
    assert call(draining, "POST", "/v1/completions", json={}).headers["retry-after"] == "1"
    assert call(draining, "GET", "/ready").headers["retry-after"] == "2"
    svc.fail = QueueFullError("full")
    full = build_asgi_app(svc, api_keys=[], max_body_bytes=1 << 20)  # type: ignore[arg-type]
    assert call(full, "POST", "/v1/chat/completions", json={}).headers["retry-after"] == "1"
    ok = call(full, "GET", "/ready")
    assert ok.status_code == 200 and "retry-after" not in ok.headers


def test_queue_full_is_a_429_with_retry_after(svc: FakeService) -> None:
    svc.fail = QueueFullError("full")
    app = build_asgi_app(svc, api_keys=[], max_body_bytes=1 << 20)  # type: ignore[arg-type]
    r = call(app, "POST", "/v1/chat/completions", json={})
    shape(r, 429, "queue_full")
    assert r.headers["retry-after"]


def test_a_bug_is_a_500_naming_only_the_request_id(svc: FakeService) -> None:
    svc.fail = RuntimeError("/secret/path exploded")
    app = build_asgi_app(svc, api_keys=[], max_body_bytes=1 << 20)  # type: ignore[arg-type]
    r = call(app, "POST", "/tokenize", json={}, headers={"X-Request-Id": "rq-9"})
    shape(r, 500, "internal_error")
    assert "rq-9" in r.json()["error"]["message"] and "secret" not in r.text


def test_what_the_table_lacks_is_404_or_405(svc: FakeService) -> None:
    app = build_asgi_app(svc, api_keys=[], max_body_bytes=1 << 20)  # type: ignore[arg-type]
    shape(call(app, "GET", "/v1/nothing"), 404, "not_found")
    shape(call(app, "POST", "/v1/models"), 405, "method_not_allowed")


def test_body_limit_holds_with_and_without_content_length(svc: FakeService) -> None:
    app = build_asgi_app(svc, api_keys=[], max_body_bytes=1024)  # type: ignore[arg-type]
    shape(call(app, "POST", "/v1/completions", content=b"{" + b" " * 2000 + b"}"), 413, "request_too_large")

    async def chunked() -> Any:
        for _ in range(4):
            yield b" " * 512

    shape(call(app, "POST", "/v1/completions", content=chunked()), 413, "request_too_large")
    assert not svc.calls
