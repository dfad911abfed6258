"""On a Ray cluster of two nodes (``ray start`` head + worker on this machine, this test's own), LlamaModel's two
replicas, one per node, both serve; when the worker node dies under load, no request that had not started
streaming is lost (the ingress resends it to the surviving replica) and every stream that had started ends with
the retryable ``engine_dead`` error chunk and ``[DONE]``, never a cut connection or a 5xx."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from serve_app.builder import LOW_LATENCY_ENV
from tests.conftest import free_port
from tests.support.cluster import BIN, LocalCluster
from tests.support.gguf_factory import ModelSpec, write_gguf
from tests.support.procs import stop_process_group

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(240)

CLIENTS = 6
BURST = 12
LOW_LATENCY = {"env_vars": LOW_LATENCY_ENV}


def serve_config(model: Path, volume: Path, port: int) -> dict[str, Any]:
    """Two LlamaModel replicas that need one ``llama_host`` each (every node has one: one replica per node); the
    Ingress and ModelCache pinned to the head, as on a cluster whose head holds the HTTP proxy."""
    on_head = {"num_cpus": 0, "resources": {"head_node": 0.01}, "runtime_env": LOW_LATENCY}
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "llm", "route_prefix": "/", "import_path": "serve_app.builder:build_app",
            "args": {"model": {"filename": str(model)}, "cache_dir": str(volume), "accelerator": "cpu",
                     # Slots for the whole burst on either replica, next to the steady load: every burst stream
                     # starts at once, so the ones on the lost node are still running when it dies (with 4 slots,
                     # an uneven split queued the last ones behind the others, and the lost node's had finished).
                     "engine": {"n_parallel": 12, "n_ctx_per_slot": 1024, "n_threads": 1, "max_queued_requests": 32},
                     # The default router: every request is a new conversation, so rendezvous hashing spreads the
                     # burst over both nodes, and it counts the burst it routes before Serve sends any (Ray's power
                     # of two choices reads one stale queue length for a whole burst and can put it all on one node,
                     # leaving no stream on the node that dies).
                     "replicas": {"num_replicas": 2}},
            "deployments": [
                {"name": "LlamaModel",
                 "ray_actor_options": {"num_cpus": 1, "resources": {"llama_host": 1}, "runtime_env": LOW_LATENCY}},
                {"name": "Ingress", "ray_actor_options": on_head},
                {"name": "ModelCache", "ray_actor_options": {**on_head, "runtime_env": {}}},
            ],
        }],
    }


_CONVERSATIONS = itertools.count()


def node_generations(metrics_port: int) -> float:
    """ray_gguf_generations_total as exported by one node: only replicas on that node report there."""
    try:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    except httpx.TransportError:
        return 0.0
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith("ray_gguf_generations_total"))


def wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(log.read_text()[-3000:])


async def one_request(client: httpx.AsyncClient, stream: bool, max_tokens: int = 300,
                      started: asyncio.Event | None = None) -> dict[str, Any]:
    # A new conversation each time: the prefix-affinity router spreads conversations over the replicas (one
    # conversation would stay on the replica that caches it).
    body = {"messages": [{"role": "user", "content": f"count {next(_CONVERSATIONS)}"}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": stream}
    if not stream:
        r = await client.post("/v1/chat/completions", json=body)
        return {"stream": False, "status": r.status_code, "body": r.text[:300]}
    events: list[Any] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"stream": True, "status": r.status_code, "body": (await r.aread()).decode()[:300]}
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
                if started is not None and len(events) > 1:  # the role chunk, then content: it is generating
                    started.set()
    return {"stream": True, "status": 200, "events": events}


async def load(base: str, until: float, out: list[dict[str, Any]], clients: int = CLIENTS) -> None:
    async def client_loop(i: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            n = 0
            while time.time() < until:
                out.append(await one_request(client, stream=(i + n) % 3 != 0))
                n += 1

    await asyncio.gather(*(client_loop(i) for i in range(clients)))


async def long_stream(base: str, started: asyncio.Event) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        return await one_request(client, stream=True, max_tokens=960, started=started)


def check_outcome(res: dict[str, Any]) -> str:
    """'ok', or 'cut' for a started stream ended by the retryable error chunk; anything else fails the test."""
    assert res["status"] == 200, res
    if not res["stream"]:
        return "ok"
    ev = res["events"]
    assert ev and ev[-1] == "[DONE]", res
    content = [e for e in ev[:-1] if e.get("choices") and e["choices"][0]["delta"].get("content")]
    if any(e.get("choices") and e["choices"][0].get("finish_reason") for e in ev[:-1]):
        return "ok"
    err = ev[-2].get("error")
    assert err and err["code"] == "engine_dead" and content, res  # only a stream that had started may be cut
    return "cut"


def test_two_nodes_serve_and_losing_one_loses_no_unstarted_request(tmp_path: Path) -> None:
    model = Path(write_gguf(tmp_path / "tiny.gguf", ModelSpec()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO), RAY_AUTH_MODE="token",
               RAY_metrics_report_interval_ms="1000")
    cluster = LocalCluster(env, tmp_path)
    serve_proc = None
    try:
        head = cluster.start_node("a", 2, {"head_node": 1, "llama_host": 1})
        worker = cluster.start_node("b", 1, {"llama_host": 1})
        port = free_port()
        cfg = tmp_path / "serve.yaml"
        cfg.write_text(yaml.safe_dump(serve_config(model, tmp_path / "volume", port)))
        serve_log = tmp_path / "serve.log"
        with serve_log.open("w") as log:
            serve_proc = subprocess.Popen([str(BIN / "serve"), "run", "--address", cluster.address, str(cfg)],
                                          cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, serve_proc, serve_log)

        # Both replicas serve: each node's own metrics export counts generations of the replica it hosts.
        warm: list[dict[str, Any]] = []
        deadline = time.time() + 20
        while min(node_generations(head.metrics_port), node_generations(worker.metrics_port)) == 0:
            assert time.time() < deadline, (node_generations(head.metrics_port), node_generations(worker.metrics_port))
            asyncio.run(load(base, time.time() + 1.0, warm))
        assert all(check_outcome(r) == "ok" for r in warm)

        results: list[dict[str, Any]] = []

        async def load_and_kill() -> None:
            # Steady load throughout (requests arriving before, during and after the loss), plus a burst of long
            # streams the router spreads over both replicas: the node dies once every one of them is generating.
            steady = asyncio.create_task(load(base, time.time() + 6.0, results, clients=4))
            flags = [asyncio.Event() for _ in range(BURST)]
            burst = [asyncio.create_task(long_stream(base, f)) for f in flags]
            await asyncio.wait_for(asyncio.gather(*(f.wait() for f in flags)), 20)
            await asyncio.to_thread(cluster.kill_node, worker)
            killed_at = len(results)
            results.extend(await asyncio.gather(*burst))
            await steady
            assert len(results) > killed_at + BURST + 4, "requests after the node died must be served"

        asyncio.run(load_and_kill())
        outcomes = [check_outcome(r) for r in results]
        assert "cut" in outcomes, "the node died with no stream in flight: the test did not test a loss"
        print(f"multinode: {outcomes.count('ok')} served, {outcomes.count('cut')} started streams cut")
    finally:
        if serve_proc is not None:
            stop_process_group(serve_proc)
        cluster.close()
