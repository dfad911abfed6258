"""Replica lifecycle on a shared volume: a warm start neither downloads nor re-hashes, and a cached file that
llama.cpp cannot load (corrupted on disk with its size and mtime kept, so the warm check cannot see it) is
re-verified and healed by ModelCache once, then served."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from ray import serve

from serve_app.builder import build_app
from serve_app.cache.store import ModelStore
from serve_app.config import ModelRef
from tests.conftest import TEST_FILE, TEST_REPO, wait_ready

pytestmark = pytest.mark.timeout(240)


def deploy(name: str, base: str, volume: Path) -> tuple[str, dict]:
    args = {"model": {"repo_id": TEST_REPO, "filename": TEST_FILE}, "cache_dir": str(volume),
            "accelerator": "cpu", "engine": {"n_parallel": 2, "n_ctx_per_slot": 256}}
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    url = f"{base}/{name}"
    wait_ready(url)
    return url, httpx.get(f"{url}/stats").json()


def deploy_slow(base: str, name: str, tmp_path: Path) -> str:
    """An app on a model slower than the tiny one (a local file), so a generation is really still running while a
    test acts on it; returns its URL (not waited for)."""
    from tests.support.gguf_factory import ModelSpec, write_gguf

    path = write_gguf(tmp_path / "m.gguf", ModelSpec(n_layer=4, n_embd=256, n_head=4, n_head_kv=4, n_ff=1024))
    args = {"model": {"filename": str(path)}, "cache_dir": str(tmp_path / "vol"), "accelerator": "cpu",
            "engine": {"n_parallel": 2, "n_ctx_per_slot": 1024}}
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    return f"{base}/{name}"


def test_warm_start_skips_download_and_rehash(ray_session: str, hub, tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    ModelStore(str(volume)).ensure(ModelRef(repo_id=TEST_REPO, filename=TEST_FILE))  # warm the cache (CLI-style)
    hub.reset_log()
    try:
        url, stats = deploy("warm", ray_session, volume)
        assert hub.requests == [], hub.requests  # manifest pinned the commit: zero network calls
        assert stats["phases"]["cache_s"] < 1.0, stats["phases"]
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200
    finally:
        serve.delete("warm")


def test_unloadable_file_is_healed_once(ray_session: str, hub, tiny_model: Path, tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    cached = ModelStore(str(volume)).ensure(ModelRef(repo_id=TEST_REPO, filename=TEST_FILE))
    path = cached.path
    st = os.stat(path)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:  # break the GGUF magic: same size, llama.cpp refuses the file
        f.write(b"XXXX")
    os.chmod(path, st.st_mode)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # keep mtime: the warm check still says "present"
    hub.reset_log()
    try:
        url, stats = deploy("healed", ray_session, volume)
        assert hub.body_downloads() == 1  # re-downloaded exactly once by heal()
        assert Path(path).read_bytes() == tiny_model.read_bytes()
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200
    finally:
        serve.delete("healed")


def test_batched_admission_window(ray_session: str, tmp_path: Path) -> None:
    """With a @serve.batch window, requests arriving together are admitted together and all complete."""
    import asyncio

    from tests.support.gguf_factory import write_gguf

    path = write_gguf(tmp_path / "m.gguf")
    args = {"model": {"filename": str(path)}, "cache_dir": str(tmp_path / "vol"), "accelerator": "cpu",
            "engine": {"n_parallel": 4, "n_ctx_per_slot": 256},
            "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.05}}
    serve.run(build_app(args), name="windowed", route_prefix="/windowed")
    url = f"{ray_session}/windowed"
    try:
        wait_ready(url)

        async def main() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(*[c.post(f"{url}/v1/completions", json={
                    "prompt": f"hello {i}", "max_tokens": 4, "ignore_eos": True}) for i in range(4)])

        outs = asyncio.run(main())
        assert [r.status_code for r in outs] == [200] * 4
        assert all(r.json()["usage"]["completion_tokens"] == 4 for r in outs)
    finally:
        serve.delete("windowed")


def test_drain_refuses_new_requests_and_finishes_in_flight(ray_session: str, tmp_path: Path) -> None:
    """Graceful shutdown: after drain(), new requests get 503 + Retry-After, /ready says shutting_down, and a
    generation already running completes."""
    import threading

    url = deploy_slow(ray_session, "drained", tmp_path)
    try:
        wait_ready(url)
        result: dict = {}

        def long() -> None:
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 900, "ignore_eos": True},
                           timeout=120)
            result.update(status=r.status_code, usage=r.json().get("usage"))

        t = threading.Thread(target=long)
        t.start()
        while httpx.get(f"{url}/stats").json()["slots_busy"] == 0:
            pass
        drain = serve.get_app_handle("drained").drain.remote(60)
        new = None
        for _ in range(50):
            new = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            if new.status_code == 503:
                break
        assert new is not None and new.status_code == 503, new.text if new else None
        assert new.json()["error"]["code"] == "shutting_down" and new.headers["retry-after"]
        assert httpx.get(f"{url}/ready").status_code == 503
        assert drain.result(timeout_s=120)["drained"] is True
        t.join(60)
        assert result == {"status": 200, "usage": {"prompt_tokens": result["usage"]["prompt_tokens"],
                                                   "completion_tokens": 900,
                                                   "total_tokens": result["usage"]["total_tokens"],
                                                   "prompt_tokens_details": {"cached_tokens": 0}}}
    finally:
        serve.delete("drained")


def test_model_replica_dying_mid_stream_gives_an_error_chunk_then_recovers(ray_session: str, tmp_path: Path) -> None:
    """Killing LlamaModel's process while it streams: the client gets an OpenAI-style error chunk (engine_dead,
    retryable) and ``[DONE]``, not a cut connection; Ray Serve restarts the replica and the app serves again."""
    import json
    import threading
    import time

    import ray

    url = deploy_slow(ray_session, "killed", tmp_path)
    try:
        wait_ready(url)
        lines: list[str] = []

        def kill_when_streaming() -> None:
            while not any('"text":"' in ln for ln in lines):
                time.sleep(0.01)
            name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                        if a["name"].startswith("SERVE_REPLICA::killed#LlamaModel"))
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=False)

        killer = threading.Thread(target=kill_when_streaming, daemon=True)
        killer.start()
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json={"prompt": "hi", "max_tokens": 900, "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line:
                    lines.append(line)
        killer.join(10)
        assert lines[-1] == "data: [DONE]"
        err = json.loads(lines[-2][len("data: "):])["error"]
        assert err["code"] == "engine_dead" and "retry" in err["message"], err
        assert "Traceback" not in "".join(lines)
        wait_ready(url)  # Ray Serve replaced the replica; the model loads again from the volume
        again = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60)
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 3
    finally:
        serve.delete("killed")
