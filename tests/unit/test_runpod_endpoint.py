"""Invariant: one container command serves both RunPod endpoint types, picked from the environment alone: a
queue worker wherever RunPod hands out jobs (or nothing says otherwise), a load-balancing worker where ``PORT`` /
``PORT_HEALTH`` are set, and ``GGUF_SERVE_RUNPOD_MODE`` wins over both; ``/ping`` maps every readiness state to
RunPod's three answers (200 ready, 204 loading, 503 failed)."""

from __future__ import annotations

import pytest

from serve_app.ingress.ping import ping_status
from serve_app.settings import Settings

RUNPOD_VARS = ("RUNPOD_WEBHOOK_GET_JOB", "PORT", "PORT_HEALTH", "GGUF_SERVE_RUNPOD_MODE")


@pytest.mark.parametrize(("env", "mode", "health"), [
    ({}, "queue", None),
    ({"RUNPOD_WEBHOOK_GET_JOB": "https://api.runpod.ai/v2/x/job-take/$ID"}, "queue", None),
    ({"PORT": "5000", "PORT_HEALTH": "5000"}, "lb", None),  # one port: the Ingress answers /ping
    ({"PORT": "5000", "PORT_HEALTH": "5001"}, "lb", 5001),
    ({"PORT_HEALTH": "5001"}, "lb", 5001),
    ({"PORT": "", "PORT_HEALTH": ""}, "queue", None),
    ({"PORT": "5000", "GGUF_SERVE_RUNPOD_MODE": "queue"}, "queue", None),
    ({"GGUF_SERVE_RUNPOD_MODE": "lb"}, "lb", None),
])
def test_the_endpoint_type_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                      mode: str, health: int | None) -> None:
    for var in RUNPOD_VARS:
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = Settings()
    assert (s.runpod_endpoint(), s.health_port()) == (mode, health)


def test_a_bad_port_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "70000")
    with pytest.raises(ValueError):
        Settings()


@pytest.mark.parametrize(("state", "status"), [("ready", 200), ("loading", 204), ("unavailable", 204),
                                               ("failed", 503), ("shutting_down", 503), ("anything", 503)])
def test_ping_status(state: str, status: int) -> None:
    assert ping_status(state) == status


def test_the_health_listener_answers_by_the_same_rule() -> None:
    """The worker's own /ping listener (PORT_HEALTH apart from PORT): 204 without a body while loading, 503 with
    the fixed reason once start-up failed, 200 when ready; other paths are 404s."""
    import httpx

    from serve_app.runpod import lb
    from tests.conftest import free_port

    health, port = lb.Health(), free_port()
    server = lb.serve_health(health, port, host="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{port}"
        r = httpx.get(f"{url}/ping", timeout=5)
        assert (r.status_code, r.content) == (204, b"")
        health.set({"status": "failed", "reason": "the worker cannot start; see its log"})
        r = httpx.get(f"{url}/ping", timeout=5)
        assert r.status_code == 503 and r.json()["status"] == "failed"
        health.set(lb.ready_body({"state": "ready", "model": "m", "slots_total": 2}))
        r = httpx.get(f"{url}/ping", timeout=5)
        assert r.status_code == 200 and r.json() == {"status": "ready", "model": "m"}
        assert httpx.get(f"{url}/v1/models", timeout=5).status_code == 404
    finally:
        server.shutdown()
        server.server_close()


def test_following_the_ingress_reads_a_failed_call_as_unavailable() -> None:
    import threading

    from serve_app.runpod import lb

    class Handle:
        calls = 0

        class ready:  # noqa: N801 - the shape of a handle method
            @staticmethod
            def remote() -> Handle.Ref:
                return Handle.Ref()

        class Ref:
            def result(self, timeout_s: float) -> dict[str, str]:
                Handle.calls += 1
                if Handle.calls == 1:
                    raise TimeoutError("restarting")
                stop.set()
                return {"state": "failed", "model": "m", "reason": "engine_dead: the engine stopped"}

    health, stop = lb.Health(), threading.Event()
    seen: list[dict[str, object]] = []
    health.set = lambda body: seen.append(body)  # type: ignore[method-assign]
    lb.POLL_S, old = 0.01, lb.POLL_S
    try:
        lb.follow(Handle(), health, stop, 1.0)
    finally:
        lb.POLL_S = old
    assert [b["status"] for b in seen] == ["unavailable", "failed"]
    assert seen[-1]["reason"] == "engine_dead: the engine stopped"
