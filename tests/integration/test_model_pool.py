"""Invariant: with ``max_models_per_replica``, the chat models of ``models:`` share one LlamaModel deployment
whose replicas load a model on its first request and hold at most N: each replica preloads the first model; a
request for another model loads it on one replica, unloading that replica's least recently used model; from then
on that model's requests go to the replica holding it (Ray Serve's multiplexed routing through our request
router), and the other models' requests to the replicas holding those; an eviction waits for the running stream
of the model it unloads; a model that cannot load answers with its error; ``/v1/models`` lists every model whether
held or not; ``/stats`` tells which replica holds what; an unknown model is still a 404.

Two replicas, N = 1, three tiny chat models and one whose file is missing (its requests get the load error; the
others keep answering); the stream-level eviction guarantees are in test_pool_eviction.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from serve_app import builder
from serve_app.config import AppArgs
from tests.conftest import TEST_FILE, TEST_REPO, wait_ready
from tests.support.gguf_factory import ModelSpec, write_gguf

pytestmark = pytest.mark.timeout(240)

APP, PREFIX = "pool", "/pool"
ALPHA, BETA, GAMMA, BROKEN = "alpha", "beta", "gamma", "broken"


@pytest.fixture(scope="module")
def pool_app(ray_session: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    d = tmp_path_factory.mktemp("pool")
    beta = write_gguf(d / "beta.gguf", ModelSpec(seed=7, name="beta"))
    gamma = write_gguf(d / "gamma.gguf", ModelSpec(seed=11, name="gamma"))
    args = {
        "models": [{"repo_id": TEST_REPO, "filename": TEST_FILE, "name": ALPHA}, {"filename": beta, "name": BETA},
                   {"filename": gamma, "name": GAMMA}, {"filename": str(d / "missing.gguf"), "name": BROKEN}],
        "max_models_per_replica": 1, "replicas": {"num_replicas": 2},
        "engine": {"n_parallel": 2, "n_ctx_per_slot": 2048, "n_batch": 256, "n_ubatch": 256, "n_threads": 1},
        "cache_dir": str(d / "volume"), "accelerator": "cpu",
    }
    plain = builder.llama_model_options

    def light(a: AppArgs, use_gpu: bool) -> dict[str, Any]:
        # Half a logical CPU each, so both replicas fit beside the session's other apps (one llama.cpp thread each).
        opts = plain(a, use_gpu)
        return {**opts, "ray_actor_options": {**opts["ray_actor_options"], "num_cpus": 0.5}}

    mp = pytest.MonkeyPatch()
    mp.setattr(builder, "llama_model_options", light)
    try:
        serve.run(builder.build_app(args), name=APP, route_prefix=PREFIX)
    finally:
        mp.undo()
    base = ray_session + PREFIX
    try:
        wait_ready(base)
        yield base
    finally:
        serve.delete(APP, _blocking=False)


def held(base: str) -> dict[str, list[str]]:
    """``{replica: models it holds}`` from /stats."""
    stats = httpx.get(f"{base}/stats", timeout=30).json()
    return {r["replica"]: r["loaded_models"] for r in stats["replicas"]}


def wait_held(base: str, want: list[list[str]], timeout: float = 60) -> dict[str, list[str]]:
    deadline = time.time() + timeout
    while True:
        now = held(base)
        if sorted(now.values()) == sorted(want) or time.time() > deadline:
            return now
        time.sleep(0.3)


def ask(base: str, model: str) -> dict[str, Any]:
    r = httpx.post(f"{base}/v1/completions", timeout=60, json={
        "model": model, "prompt": "the quick brown fox", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert body["model"] == model and body["usage"]["completion_tokens"] == 4
    return body


def test_models_load_on_demand_evict_lru_and_route_to_their_holder(pool_app: str) -> None:
    ids = [m["id"] for m in httpx.get(f"{pool_app}/v1/models").json()["data"]]
    assert ids == [ALPHA, BETA, GAMMA, BROKEN]
    # Each replica preloads the default (first) model, within its limit of one.
    assert sorted(wait_held(pool_app, [[ALPHA], [ALPHA]]).values()) == [[ALPHA], [ALPHA]]

    first = ask(pool_app, BETA)  # held nowhere: one replica unloads alpha and loads beta
    beta_home = first["timings"]["replica"]
    now = wait_held(pool_app, [[ALPHA], [BETA]])
    assert now[beta_home] == [BETA] and sorted(now.values()) == [[ALPHA], [BETA]]
    alpha_home = next(r for r, models in now.items() if models == [ALPHA])
    time.sleep(1.0)  # Serve's controller tells the router which replica holds what every ~0.1 s

    for _ in range(4):
        assert ask(pool_app, BETA)["timings"]["replica"] == beta_home
        assert ask(pool_app, ALPHA)["timings"]["replica"] == alpha_home
    assert held(pool_app) == now  # no thrashing: nothing was loaded again


def test_eviction_lets_the_evicted_models_stream_finish_first(pool_app: str) -> None:
    """Each replica holds one model with a long stream running on it; a third model must evict one of them: the
    stream finishes whole (the eviction waits for it), then the third model loads and answers."""
    import threading

    before = held(pool_app)
    assert sorted(before.values()) == [[ALPHA], [BETA]], before
    ends: dict[str, float] = {}
    finished: dict[str, tuple[int, str]] = {}
    started = {m: threading.Event() for m in (ALPHA, BETA)}

    def stream(model: str) -> None:
        body = {"model": model, "prompt": "the quick brown fox", "max_tokens": 1500, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        n, reason = 0, ""
        with httpx.stream("POST", f"{pool_app}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                started[model].set()
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                if chunk.get("usage"):
                    n = chunk["usage"]["completion_tokens"]
                    # Stamped as the last chunk arrives, not when the connection closes: the replica frees the
                    # model only after sending it, so the third model's answer can only come later.
                    ends[model] = time.perf_counter()
                reason = next((c["finish_reason"] for c in chunk.get("choices", []) if c.get("finish_reason")),
                              reason)
        finished[model] = (n, reason)

    threads = [threading.Thread(target=stream, args=(m,)) for m in (ALPHA, BETA)]
    for t in threads:
        t.start()
    for e in started.values():
        assert e.wait(30)
    ask(pool_app, GAMMA)  # held nowhere: one replica must unload alpha or beta, with its stream running
    gamma_done = time.perf_counter()
    for t in threads:
        t.join(120)
    assert finished == {ALPHA: (1500, "length"), BETA: (1500, "length")}
    now = held(pool_app)
    assert sorted(now.values()) in ([[ALPHA], [GAMMA]], [[BETA], [GAMMA]]), now
    evicted = BETA if [ALPHA] in now.values() else ALPHA
    assert gamma_done >= ends[evicted]  # the load waited for the evicted model's stream to end


def test_a_model_that_cannot_load_is_an_error_and_the_others_still_answer(pool_app: str) -> None:
    r = httpx.post(f"{pool_app}/v1/completions", timeout=60,
                   json={"model": BROKEN, "prompt": "x", "max_tokens": 1})
    assert r.status_code == 404 and r.json()["error"]["code"] == "local_file_not_found"
    assert "Traceback" not in r.text and "missing.gguf" not in r.text
    for model in (ALPHA, BETA):
        ask(pool_app, model)


def test_an_unknown_model_is_still_a_404_listing_the_pool(pool_app: str) -> None:
    r = httpx.post(f"{pool_app}/v1/completions", json={"model": "delta", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 404
    assert ALPHA in r.json()["error"]["message"] and BETA in r.json()["error"]["message"]


def test_pool_state_is_reported_per_replica_and_ready(pool_app: str) -> None:
    ready = httpx.get(f"{pool_app}/ready")
    stats = httpx.get(f"{pool_app}/stats").json()
    assert ready.status_code == 200, (ready.text, stats)
    assert {r["model"] for r in stats["replicas"]} == {"LlamaModel"}
    # One held model of 2 slots each (each replica holds one after the previous tests).
    assert [r["slots_total"] for r in stats["replicas"]] == [2, 2], stats


def test_the_pool_config_is_checked_at_deploy_time() -> None:
    with pytest.raises(ValueError, match="max_models_per_replica"):
        AppArgs.model_validate({"models": [{"filename": "e.gguf", "kind": "embedding"}],
                                "max_models_per_replica": 1})
    args = AppArgs.model_validate({"models": [{"filename": "a.gguf"}, {"filename": "b.gguf", "engine":
                                               {"n_parallel": 8}}, {"filename": "e.gguf", "kind": "embedding"}],
                                   "max_models_per_replica": 2})
    assert [args.entry_name(e) for e in args.pooled()] == ["a", "b"]
    opts = builder.pool_options(args, use_gpu=False)
    # Room for both held models' slots and queues at once: the larger model's figures, twice, plus the margin.
    per_model = 8 + args.engine.max_queued_requests
    assert opts["max_ongoing_requests"] == per_model * 2 + builder.ROUTER_MARGIN
    assert "user_config" not in opts and opts["num_replicas"] == 1
