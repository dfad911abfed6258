"""Invariant: the container command ``python -m serve_app.runpod`` works as a RunPod load-balancing endpoint:
with ``PORT``/``PORT_HEALTH`` set (and no job API) it serves no jobs; ``/ping`` on ``PORT_HEALTH`` answers 204
from the first second while the model loads and 200 once it is ready (the Ingress answers ``/ping`` on ``PORT``
by the same rule), and the OpenAI API on ``PORT`` works with the real ``openai`` and ``httpx`` clients, streaming
included. With two LlamaModel replicas, ``/stats``, ``Ingress.ready()`` (the queue worker's concurrency) and
``python -m serve_app.drain`` cover both replicas, not the one a handle call happens to reach.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import free_port
from tests.support.fake_hub import FakeHub
from tests.support.fake_runpod import REPO, log_tail, start_worker, worker_env
from tests.support.gguf_factory import ModelSpec, write_gguf
from tests.support.procs import stop_process_group

pytestmark = pytest.mark.timeout(300)

APP = "runpod-lb"
LB_REPO, LB_FILE = "acme/lb-GGUF", "lb-F16.gguf"
MSGS = [{"role": "user", "content": "hello there"}]


def auth_env(env: dict[str, str], home: Path) -> dict[str, str]:
    """A process joining the session's cluster from another HOME: the token comes in RAY_AUTH_TOKEN."""
    token = Path.home() / ".ray" / "auth_token"
    env["HOME"] = str(home)
    if token.exists():
        env["RAY_AUTH_TOKEN"] = token.read_text().strip()
    return env


def ping(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.TransportError:
        return None


def wait_for(url: str, status: int, proc: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    seen: list[int | None] = []
    while (got := ping(url)) != status:
        assert proc.poll() is None, f"worker exited rc={proc.returncode}:\n{log_tail(log_path)}"
        assert time.monotonic() < deadline, f"{url} never answered {status} (saw {seen[-5:]}):\n{log_tail(log_path)}"
        seen.append(got)
        time.sleep(0.1)


@pytest.fixture(scope="module")
def lb_worker(ray_session: str, hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A load-balancing worker joining the session's cluster (its Serve port is ``PORT``), started before its app
    exists; the app (2 LlamaModel replicas of a 1-slot model) is deployed with its download stalled."""
    from ray import serve

    from serve_app import builder

    tmp = tmp_path_factory.mktemp("runpod_lb")
    port, health_port = int(ray_session.rsplit(":", 1)[1]), free_port()
    log_path = tmp / "worker.log"
    env = auth_env(worker_env(PORT=str(port), PORT_HEALTH=str(health_port), GGUF_SERVE_APP_NAME=APP), tmp)
    proc = start_worker(log_path, env)
    health = f"http://127.0.0.1:{health_port}/ping"
    try:
        # /ping answers from the first second, long before there is a model: 204
        wait_for(health, 204, proc, log_path, timeout_s=60)
        hub.add_file(LB_REPO, LB_FILE, write_gguf(tmp / LB_FILE, ModelSpec(seed=7)))
        hub.set_fault("stall", path_contains=LB_FILE, seconds=3)
        args = {"model": {"repo_id": LB_REPO, "filename": LB_FILE}, "cache_dir": str(tmp / "volume"),
                "accelerator": "cpu", "engine": {"n_parallel": 1, "n_ctx_per_slot": 128, "n_threads": 1}}
        two = {**builder.llama_model_options(builder.AppArgs.model_validate(args), False), "num_replicas": 2}
        original = builder.llama_model_options
        builder.llama_model_options = lambda *a: two  # type: ignore[assignment]
        try:
            app = builder.build_app(args)
        finally:
            builder.llama_model_options = original  # type: ignore[assignment]
        serve.run(app, name=APP, route_prefix=f"/{APP}")
        yield {"base": f"{ray_session}/{APP}", "health": health, "proc": proc, "log": log_path, "home": tmp}
        assert proc.poll() is None, f"the worker died:\n{log_tail(log_path)}"
    finally:
        t0 = time.monotonic()
        stop_process_group(proc)
        print(f"worker stopped in {time.monotonic() - t0:.1f} s")
        serve.delete(APP, _blocking=False)
        print(log_tail(log_path, 1500))


def test_ping_is_204_while_loading_then_200_and_the_api_streams(lb_worker: dict[str, Any]) -> None:
    base, proc, log_path = lb_worker["base"], lb_worker["proc"], lb_worker["log"]
    # the download is stalled: the Ingress's own /ping (on PORT) and the worker's (on PORT_HEALTH) say loading
    assert ping(f"{base}/ping") == 204
    assert ping(lb_worker["health"]) == 204
    wait_for(lb_worker["health"], 200, proc, log_path)
    r = httpx.get(f"{base}/ping", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ready", r.text

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    [model] = [m.id for m in client.models.list().data]
    full = client.chat.completions.create(model=model, messages=MSGS, max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert full.usage is not None and full.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(model=model, messages=MSGS, max_tokens=6, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    with httpx.stream("POST", f"{base}/v1/completions", timeout=60, json={
            "prompt": "the quick", "max_tokens": 4, "stream": True, "ignore_eos": True}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in resp.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 2


def test_stats_concurrency_and_drain_cover_every_replica(lb_worker: dict[str, Any]) -> None:
    from ray import serve

    from serve_app.runpod.handler import concurrency_target

    wait_for(lb_worker["health"], 200, lb_worker["proc"], lb_worker["log"])
    deadline = time.monotonic() + 60
    while True:  # both replicas ready (the second may still be reading the file the first downloaded)
        stats = httpx.get(f"{lb_worker['base']}/stats", timeout=10).json()
        if [r["state"] for r in stats["replicas"]] == ["ready", "ready"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(stats["replicas"]) == 2 and len({r["replica"] for r in stats["replicas"]}) == 2, stats
    assert stats["slots_total"] == 2 and all(r["slots_total"] == 1 for r in stats["replicas"]), stats
    info = serve.get_app_handle(APP).ready.remote().result(timeout_s=30)
    assert info["replicas"] == 2 and info["slots_total"] == 2, info
    assert concurrency_target(info, 0, None) == 2  # the queue worker's concurrency: both replicas' slots

    env = auth_env(worker_env(), lb_worker["home"])
    r = subprocess.run([sys.executable, "-m", "serve_app.drain", "--app", APP, "--timeout", "5"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["drained"] and out["deleted"] and out["model_replicas"] == 2 and out["ingress_replicas"] == 1, out
