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
