"""Invariant: the container command ``python -m serve_app.runpod``, run under the real ``runpod`` SDK, joins
the session's Ray cluster, waits for the ``llm`` app, and answers every job shape worker-vllm accepts (OpenAI chat /
completions / models, stream and not, legacy ``messages`` / ``prompt`` + ``sampling_params`` / ``stream``) with
worker-vllm's output contract, as seen on RunPod's own wire (job-stream / job-done posts to a loopback fake of the
job API): one OpenAI dict per non-stream job, ``data:`` SSE strings ending ``data: [DONE]`` per stream job, and a
bad job fails alone with a readable error (its ``error`` is the JSON text of ``{"message", "type", "param", "code"}``,
never a Python repr or a traceback) while the worker keeps taking jobs, as many at once as the engine has slots.
The same worker serves RunPod's local ``--rp_serve_api`` ``POST /runsync``.
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
import pytest
import yaml

from tests.conftest import LLM_APP_ARGS, free_port
from tests.support.fake_runpod import (
    REPO,
    WORKER_MODULE,
    FakeRunPod,
    local_api_worker,
    log_tail,
    start_worker,
    wait_for_local_api,
    worker_env,
)
from tests.support.procs import stop_process_group

pytestmark = pytest.mark.timeout(300)

MSGS = [{"role": "user", "content": "hello there"}]
GEN = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
SLOTS = LLM_APP_ARGS["engine"]["n_parallel"]


# ---- worker processes ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runpod_api(llm_app: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeRunPod]:
    """The fake job API with the real SDK worker loop polling it (``RUNPOD_WEBHOOK_*`` set: production mode)."""
    log_path = tmp_path_factory.mktemp("runpod") / "worker.log"
    with FakeRunPod() as fake:
        proc = start_worker(log_path, worker_env(**fake.env()))
        try:
            deadline = time.monotonic() + 150
            while not fake.takes:  # the SDK polls only once the model is ready
                assert proc.poll() is None, f"worker exited rc={proc.returncode}:\n{log_tail(log_path)}"
                assert time.monotonic() < deadline, f"worker never polled for jobs:\n{log_tail(log_path)}"
                time.sleep(0.2)
            yield fake
            assert proc.poll() is None, f"the worker died:\n{log_tail(log_path)}"
        finally:
            stop_process_group(proc)
        print(log_tail(log_path, 1500))


def run_jobs(fake: FakeRunPod, inputs: list[Any]) -> list[str]:
    """Queue the jobs together (so one job-take-batch can hand several out) and wait until all are done."""
    ids = fake.add_jobs(inputs)
    for job_id in ids:
        fake.wait_done(job_id, timeout_s=120)
    return ids


def sse_events(items: list[Any]) -> list[Any]:
    """The JSON payloads of the ``data:`` strings a stream job yielded; ``[DONE]`` stays a string."""
    events: list[Any] = []
    for item in items:
        assert isinstance(item, str), item
        for block in item.split("\n\n"):
            if block.strip():
                assert block.startswith("data: "), item
                payload = block[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_non_stream(fake: FakeRunPod, job_id: str, obj: str) -> dict[str, Any]:
    done = fake.done_post(job_id)
    assert done.query["isStream"] == "true"  # a generator handler
    assert set(done.body) == {"output"}, done.body
    [resp] = done.body["output"]  # return_aggregate_stream: exactly one yielded item
    assert fake.stream_outputs(job_id) == [resp]
    assert resp["object"] == obj, resp
    if obj != "list":
        assert resp["choices"][0]["finish_reason"] == "length"
        assert resp["usage"]["completion_tokens"] == 8
    return resp


def assert_stream(fake: FakeRunPod, job_id: str, chunk_obj: str) -> str:
    items = fake.stream_outputs(job_id)
    assert fake.done_post(job_id).body == {"output": items}
    assert items[-1] == "data: [DONE]\n\n"
    events = sse_events(items)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = events[:-1]
    assert chunks and all(c["object"] == chunk_obj for c in chunks), chunks
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["length"]
    if chunk_obj == "chat.completion.chunk":
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    return "".join(c["choices"][0]["text"] for c in chunks)


def assert_failed(fake: FakeRunPod, job_id: str, *fragments: str) -> str:
    body = fake.done_post(job_id).body
    assert set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err, str) and "Traceback" not in err and "traceback" not in err, err
    # the SDK fails the job with str() of the error item's object: it is JSON, not a Python repr
    assert set(json.loads(err)) == {"message", "type", "param", "code"}, err
    for f in fragments:
        assert f in err, err
    assert fake.stream_outputs(job_id) == []  # the SDK stops at the error item
    return err


# ---- the production worker loop -----------------------------------------------------------------------------


def test_openai_shapes(runpod_api: FakeRunPod) -> None:
    fake = runpod_api
    chat, chat_stream, comp, comp_stream, models, models_empty = run_jobs(fake, [
        {"openai_route": "/v1/chat/completions", "openai_input": {"messages": MSGS, **GEN}},
        {"openai_route": "/v1/chat/completions", "openai_input": {"messages": MSGS, **GEN, "stream": True}},
        {"openai_route": "/v1/completions", "openai_input": {"prompt": "the quick brown", **GEN}},
        {"openai_route": "/v1/completions", "openai_input": {"prompt": "the quick brown", **GEN, "stream": True}},
        {"openai_route": "/v1/models"},
        {"openai_route": "/v1/models", "openai_input": {}},
    ])
    full = assert_non_stream(fake, chat, "chat.completion")
    assert full["id"] == f"chatcmpl-{chat}"  # the RunPod job id is the request id
    assert assert_stream(fake, chat_stream, "chat.completion.chunk") == full["choices"][0]["message"]["content"]
    text = assert_non_stream(fake, comp, "text_completion")["choices"][0]["text"]
    assert assert_stream(fake, comp_stream, "text_completion") == text
    listing = assert_non_stream(fake, models, "list")
    assert [m["id"] for m in listing["data"]] == [full["model"]] and listing["data"][0]["object"] == "model"
    assert assert_non_stream(fake, models_empty, "list") == listing


def test_legacy_shapes(runpod_api: FakeRunPod) -> None:
    fake = runpod_api
    messages, prompt, stream, templated = run_jobs(fake, [
        {"messages": MSGS, "sampling_params": GEN},
        {"prompt": "the quick brown", "sampling_params": {**GEN, "top_p": 0.9, "top_k": 20, "seed": 3,
                                                          "stop": ["<never>"], "repetition_penalty": 1.0}},
        {"prompt": "the quick brown", "sampling_params": GEN, "stream": True},
        {"prompt": "hello there", "apply_chat_template": True, "sampling_params": GEN},
    ])
    chat = assert_non_stream(fake, messages, "chat.completion")
    assert chat["choices"][0]["message"]["content"]
    comp = assert_non_stream(fake, prompt, "text_completion")
    assert comp["choices"][0]["text"]
    assert assert_stream(fake, stream, "text_completion")
    # a string prompt through the chat template is the same conversation as the messages job
    assert assert_non_stream(fake, templated, "chat.completion")["choices"] == chat["choices"]


def test_bad_jobs_fail_alone_and_the_worker_keeps_going(runpod_api: FakeRunPod) -> None:
    fake = runpod_api
    hot, route, key, not_obj, wrong_model, good = run_jobs(fake, [
        {"openai_route": "/v1/chat/completions", "openai_input": {"messages": MSGS, "temperature": "hot"}},
        {"openai_route": "/v1/responses", "openai_input": {"input": "hi"}},
        {"prompt": "x", "sampling_params": GEN, "temprature": 0.5},
        "just a string",
        {"openai_input": {"model": "someone/else", "messages": MSGS, **GEN}},
        {"messages": MSGS, "sampling_params": GEN},
    ])
    assert_failed(fake, hot, "temperature", "invalid_request_error")
    assert_failed(fake, route, "unsupported openai_route '/v1/responses'")
    assert_failed(fake, key, "unknown key 'temprature'")
    assert_failed(fake, not_obj, "must be a JSON object")
    assert_failed(fake, wrong_model, "someone/else", "model_not_found")
    assert_non_stream(fake, good, "chat.completion")
    # ...and one more after the failures, on its own
    [again] = run_jobs(fake, [{"prompt": "one two", "sampling_params": GEN}])
    assert_non_stream(fake, again, "text_completion")


def test_takes_as_many_jobs_as_the_engine_has_slots(runpod_api: FakeRunPod) -> None:
    fake = runpod_api
    fake.wait_for_poll(SLOTS)  # idle, the worker asks for as many jobs as the engine has slots
    ids = run_jobs(fake, [{"prompt": f"one two {i}", "sampling_params": GEN} for i in range(SLOTS + 2)])
    for job_id in ids:
        assert_non_stream(fake, job_id, "text_completion")
    sizes = fake.batch_sizes()
    assert sizes and max(sizes) == SLOTS, sizes  # concurrency = the engine's slots, never more
    handed = [len(t.handed_out) for t in fake.takes if t.handed_out]
    assert max(handed) == SLOTS, handed  # and the worker really ran that many jobs at once


# ---- RunPod's local API (--rp_serve_api) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def rp_serve_api(llm_app: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_path = tmp_path_factory.mktemp("runpod_api") / "worker.log"
    with local_api_worker(log_path, free_port()) as base:
        yield base


def test_rp_serve_api_runsync(rp_serve_api: str) -> None:
    def runsync(job_input: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(f"{rp_serve_api}/runsync", json={"input": job_input}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    out = runsync({"openai_route": "/v1/chat/completions", "openai_input": {"messages": MSGS, **GEN}})
    assert out["status"] == "COMPLETED", out
    [resp] = out["output"]
    assert resp["object"] == "chat.completion" and resp["usage"]["completion_tokens"] == 8
    assert resp["id"] == f"chatcmpl-{out['id']}"

    out = runsync({"prompt": "the quick brown", "sampling_params": GEN, "stream": True})
    assert out["status"] == "COMPLETED" and out["output"][-1] == "data: [DONE]\n\n", out
    assert all(e == "[DONE]" or e["object"] == "text_completion" for e in sse_events(out["output"]))

    # RunPod's local test input, as documented in deploy/runpod/README.md
    job = json.loads((REPO / "deploy" / "runpod" / "test_input.json").read_text())
    r = httpx.post(f"{rp_serve_api}/runsync", json=job, timeout=120)
    assert r.status_code == 200 and r.json()["output"][0]["object"] == "chat.completion", r.text

    # The local API does not fail a generator job on an error item (production does): the error is the output.
    out = runsync({"openai_route": "/v1/nope", "openai_input": {"x": 1}})
    assert out["status"] == "COMPLETED" and out["output"][0]["error"]["code"] == "invalid_request", out


# ---- no cluster to join: the worker starts Ray and deploys the Serve config itself ------------------------


def test_worker_starts_ray_and_the_app_from_the_config(tiny_model: Path, tmp_path: Path) -> None:
    http_port, api_port = free_port(), free_port()
    config = tmp_path / "serve_config.yaml"
    config.write_text(yaml.safe_dump({
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "applications": [{
            "name": "llm", "route_prefix": "/", "import_path": "serve_app.builder:build_app",
            "args": {"model": {"filename": str(tiny_model)}, "cache_dir": str(tmp_path / "volume"),
                     "accelerator": "cpu", "engine": {"n_parallel": 2, "n_ctx_per_slot": 256, "max_queued_requests": 2}},
        }],
    }))
    log_path = tmp_path / "worker.log"
    env = worker_env(GGUF_SERVE_CONFIG=str(config))
    env["RAY_ADDRESS"] = "local"  # what `auto` falls back to when no cluster is running
    proc = start_worker(log_path, env, "--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port",
                        str(api_port))
    try:
        base = wait_for_local_api(proc, log_path, api_port)
        r = httpx.post(f"{base}/runsync", timeout=60, json={"input": {
            "messages": MSGS, "sampling_params": {**GEN, "max_tokens": 4}}})
        out = r.json()
        assert out["status"] == "COMPLETED" and out["output"][0]["usage"]["completion_tokens"] == 4, out
        # the config's own http_options were applied: the app also answers HTTP on its port
        models = httpx.get(f"http://127.0.0.1:{http_port}/v1/models", timeout=10).json()
        assert models["data"][0]["id"] == out["output"][0]["model"]
    finally:
        stop_process_group(proc)
    assert proc.returncode is not None


def test_startup_failure_is_one_readable_line(llm_app: str, tmp_path: Path) -> None:
    from ray import serve

    from serve_app.builder import build_app

    # an app whose model cannot load, beside the good one in the session cluster
    serve.run(build_app({"model": {"filename": str(tmp_path / "missing.gguf")}, "cache_dir": str(tmp_path / "v"),
                         "accelerator": "cpu", "engine": {"n_parallel": 1, "n_ctx_per_slot": 128}}),
              name="runpod-bad", route_prefix="/runpod-bad")
    try:
        r = subprocess.run([sys.executable, "-m", WORKER_MODULE], cwd=REPO, capture_output=True,
                           text=True, timeout=120, env=worker_env(GGUF_SERVE_APP_NAME="runpod-bad"))
    finally:
        serve.delete("runpod-bad", _blocking=False)
    assert r.returncode == 1
    [line] = verdicts(r.stderr)
    assert line.startswith("runpod worker cannot start: model 'missing' failed to load:"), r.stderr[-3000:]
    assert "missing.gguf" in line and "Traceback" not in r.stderr
    # an unreachable explicit address fails at once instead of hanging in ray.init
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", WORKER_MODULE], cwd=REPO, capture_output=True,
                       text=True, timeout=60, env={**worker_env(), "RAY_ADDRESS": f"127.0.0.1:{free_port()}"})
    assert r.returncode == 1 and time.monotonic() - t0 < 30
    assert [ln.split(" at ")[0] for ln in verdicts(r.stderr)] == ["runpod worker cannot start: no Ray cluster answers"]
    # and so does a worker with no cluster and no config
    r = subprocess.run([sys.executable, "-m", WORKER_MODULE], cwd=REPO, capture_output=True,
                       text=True, timeout=60,
                       env={**worker_env(GGUF_SERVE_CONFIG=str(tmp_path / "nope.yaml")), "RAY_ADDRESS": "local"})
    assert r.returncode == 1 and [ln.split(" and ")[0] for ln in verdicts(r.stderr)] == [
        "runpod worker cannot start: no Ray cluster to join"]


def verdicts(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("runpod worker cannot start:")]


# ---- exceptions from Ray are error items too ----------------------------------------------------------------


def test_ray_exceptions_become_error_items(llm_app: str) -> None:
    """The handler in this process, on a real handle whose calls raise inside Ray (ModelCache has no OpenAI
    methods): each job still ends as one readable error item, streaming or not."""
    import asyncio

    from ray import serve

    from serve_app.runpod import handler as job_handler

    async def collect(job_input: dict[str, Any]) -> list[Any]:
        return [item async for item in job_handler.handler({"id": "j1", "input": job_input})]

    worker = job_handler.WORKER
    assert worker.handle is None  # this process is not a worker: nothing to restore but the handle
    worker.handle = serve.get_deployment_handle("ModelCache", "llm")
    try:
        for job_input in ({"messages": MSGS}, {"messages": MSGS, "stream": True}):
            [item] = asyncio.run(collect(job_input))
            err = item["error"]
            assert err["type"] == "server_error" and err["message"].startswith("worker error: "), err
            assert "Traceback" not in err["message"] and "\n" not in err["message"]
        assert worker.in_flight == 0
    finally:
        worker.handle = None
