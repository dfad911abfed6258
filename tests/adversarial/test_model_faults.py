"""LlamaModel under faults, through the real graph: a hostile ``server.chat_template`` costs its request a 400 and
nothing else (the replica keeps serving and answering /ready); an engine thread that dies makes /ready say
``failed`` at once and the replica is replaced; a permanent Hub error leaves the replica ``failed`` with a short,
path-free reason, without restarts or retries; large /tokenize and /detokenize calls do not stall streams."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from ray import serve

from serve_app.builder import build_app
from tests.conftest import TEST_FILE, TEST_REPO, wait_ready
from tests.support.gguf_factory import write_gguf

pytestmark = pytest.mark.timeout(300)

NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"


def replica_actors(app: str) -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{app}#LlamaModel"))


def _crash_engine_thread(replica: Any) -> str:
    """Runs inside the LlamaModel replica (``__ray_call__``): make the engine thread's next step raise."""
    model = replica._replica_impl._user_callable_wrapper._callable
    service = getattr(model, "service", None)
    engine = service.loader.loaded.engine if service is not None else model.engine

    def fault() -> None:
        raise RuntimeError("injected engine fault")

    engine._apply_cancellations = fault
    engine.cancel("wake-up")  # the idle engine thread wakes, runs a step and dies
    return "ok"


@pytest.fixture(scope="module")
def hostile_app(ray_session: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("hostile")
    path = write_gguf(tmp / "m.gguf")
    args = {"model": {"filename": str(path)}, "cache_dir": str(tmp / "vol"), "accelerator": "cpu",
            "engine": {"n_parallel": 2, "n_ctx_per_slot": 256}, "server": {"chat_template": NESTED_LOOPS}}
    serve.run(build_app(args), name="hostile", route_prefix="/hostile")
    url = f"{ray_session}/hostile"
    wait_ready(url)
    yield url
    serve.delete("hostile")


def test_hostile_template_is_a_400_and_the_replica_keeps_serving(hostile_app: str) -> None:
    before = replica_actors("hostile")
    probes: list[tuple[int, float]] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            r = httpx.get(f"{hostile_app}/ready", timeout=30)
            probes.append((r.status_code, time.monotonic() - t0))
            time.sleep(0.1)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        r = httpx.post(f"{hostile_app}/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        ok = httpx.post(f"{hostile_app}/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
    finally:
        stop.set()
        prober.join(30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "server.chat_template" in err["message"] and err["param"] == "messages"
    assert ok.status_code == 200
    assert probes and all(code == 200 for code, _ in probes), probes
    assert max(s for _, s in probes) < 2.0, probes  # the render ran off the event loop
    assert replica_actors("hostile") == before  # not restarted


def test_dead_engine_thread_means_ready_failed_then_a_new_replica(hostile_app: str) -> None:
    [name] = replica_actors("hostile")
    assert ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(_crash_engine_thread)) == "ok"
    deadline = time.monotonic() + 5
    seen: list[dict] = []
    while time.monotonic() < deadline:
        r = httpx.get(f"{hostile_app}/ready", timeout=10)
        seen.append({"code": r.status_code, **r.json()})
        if seen[-1].get("status") == "failed":
            break
        time.sleep(0.05)
    assert seen[-1]["code"] == 503 and seen[-1]["status"] == "failed", seen[-5:]
    assert seen[-1]["reason"].startswith("engine_dead: ") and "injected" not in seen[-1]["reason"]
    refused = httpx.post(f"{hostile_app}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert refused.status_code == 503, refused.text
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:  # check_health raised: Ray Serve replaces the replica, which loads again
        if httpx.get(f"{hostile_app}/ready", timeout=10).status_code == 200:
            break
        time.sleep(0.5)
    again = httpx.post(f"{hostile_app}/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 3
    assert replica_actors("hostile") != [name]


PERMANENT = {
    "repo_not_found": {"repo_id": "acme/no-such-GGUF", "filename": TEST_FILE},
    "gated_repo": {"repo_id": "acme/gated-GGUF", "filename": TEST_FILE},
    "revision_not_found": {"repo_id": TEST_REPO, "filename": TEST_FILE, "revision": "v9-missing"},
    "file_not_found": {"repo_id": TEST_REPO, "filename": "absent-Q4_K_M.gguf"},
    "local_file_not_found": {"filename": "/nonexistent/private-dir/model.gguf"},
}
# What in a Hub request's path belongs to each case (the five apps start at once); None: no Hub request at all.
HUB_PATH = {"repo_not_found": "no-such-GGUF", "gated_repo": "gated-GGUF", "revision_not_found": "v9-missing",
            "file_not_found": f"{TEST_REPO}/revision/main", "local_file_not_found": None}


def _health_check(replica: Any) -> str | None:
    """Runs inside the LlamaModel replica: what its ``check_health`` says (None: healthy, Ray keeps it)."""
    try:
        replica._replica_impl._user_callable_wrapper._callable.check_health()
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"


@pytest.fixture(scope="module")
def permanent_apps(ray_session: str, hub, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One app per permanent failure, all deployed at once (each fails on its own; waiting for them one after
    another would only add up their start-ups)."""
    hub.add_file("acme/gated-GGUF", TEST_FILE, tiny_model, gated=True)
    hub.reset_log()
    names = {code: f"perm-{code.replace('_', '-')}" for code in PERMANENT}
    for code, name in names.items():
        args = {"model": PERMANENT[code], "cache_dir": str(tmp_path_factory.mktemp("vol")), "accelerator": "cpu",
                "engine": {"n_parallel": 1, "n_ctx_per_slot": 128}}
        serve.run(build_app(args), name=name, route_prefix=f"/{name}", blocking=False)
    try:
        yield names
    finally:
        for name in names.values():
            serve.delete(name, _blocking=False)


def hub_calls(hub: Any, code: str) -> list[dict[str, Any]]:
    mark = HUB_PATH[code]
    return [r for r in hub.requests if mark is not None and mark in r["path"]]


@pytest.mark.parametrize("code", sorted(PERMANENT))
def test_permanent_load_failure_stays_failed_without_restarts_or_retries(code: str, ray_session: str, hub,
                                                                         permanent_apps: dict[str, str]) -> None:
    name = permanent_apps[code]
    body: dict = {}
    deadline = time.monotonic() + 90
    while body.get("status") != "failed" and time.monotonic() < deadline:
        r = httpx.get(f"{ray_session}/{name}/ready", timeout=10)
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        time.sleep(0.2)
    assert r.status_code == 503 and body["status"] == "failed", body
    assert body["reason"].startswith(f"{code}: "), body
    assert "/" not in body["reason"].split(": ", 1)[1] and "private-dir" not in body["reason"], body
    stats = httpx.get(f"{ray_session}/{name}/stats", timeout=10).json()
    assert "detail" not in stats and "private-dir" not in json.dumps(stats.get("reason")), stats
    [replica] = replica_actors(name)
    # A check_health that raised would make Ray Serve replace the replica, which would fail the same way again.
    assert ray.get(ray.get_actor(replica, namespace="serve").__ray_call__.remote(_health_check)) is None
    calls = len(hub_calls(hub, code))
    time.sleep(1)
    assert len(hub_calls(hub, code)) == calls, hub_calls(hub, code)[calls:]  # no retries in the background
    assert calls <= 4, hub_calls(hub, code)  # one lookup (the client may follow a redirect), not a retry storm
    assert replica_actors(name) == [replica]


def test_streams_keep_flowing_during_large_tokenize_and_detokenize_calls(llm_app: str) -> None:
    # Sizes where LlamaModel's own work dominates: tokenizing 480 KB is one llama.cpp call of about 0.1 s on a
    # 2-core CPU, and a 100k-id detokenize took about 0.4 s before pieces were cached; on the event loop, either
    # stalls every stream. (The unit test test_tokenize_and_detokenize_run_off_the_event_loop pins where they run.)
    text = "hello world " * 40_000
    ids = httpx.post(f"{llm_app}/tokenize", json={"content": text}, timeout=120).json()["tokens"]
    bodies = {"/tokenize": json.dumps({"content": text}), "/detokenize": json.dumps({"tokens": (ids * 10)[:100_000]})}
    stop = threading.Event()
    floods: list[int] = []

    def flood() -> None:  # in a thread, so the client's own JSON work never delays the stream's reader
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                for route, body in bodies.items():
                    r = c.post(f"{llm_app}{route}", content=body, headers={"content-type": "application/json"})
                    floods.append(r.status_code)

    async def stream() -> list[float]:
        stamps: list[float] = []
        async with httpx.AsyncClient(timeout=120) as c, c.stream("POST", f"{llm_app}/v1/completions", json={
                "prompt": "hi", "max_tokens": 300, "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    stamps.append(time.monotonic())
                    assert "error" not in json.loads(line[6:]), line
        return stamps

    flooders = [threading.Thread(target=flood, daemon=True)]
    for t in flooders:
        t.start()
    try:
        time.sleep(1.0)  # the flood is under way before the stream starts
        stamps = asyncio.run(stream())
    finally:
        stop.set()
        for t in flooders:
            t.join(60)
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert floods and set(floods) == {200}, floods
    assert len(stamps) > 10 and max(gaps) < 0.2, (len(stamps), len(floods), sorted(gaps)[-5:])
