#!/usr/bin/env python3
"""Where the time to first token goes between an HTTP client and the engine, and what Ray Serve itself costs.

Four streaming paths, measured interleaved on one Ray cluster, one request at a time with a short pause between
requests (an idle server, so the figure is the path's latency, not queueing):

  ours_http     - the real app: HTTP -> Ray proxy -> Ingress -> LlamaModel -> engine (the bench model)
  ours_handle   - the same app through a handle to Ingress (the RunPod worker's path: no proxy, no HTTP)
  floor_http    - the same graph shape with no model and no code of ours: HTTP -> proxy -> a bare Starlette ingress
                  -> an echo deployment whose generator yields one item at once
  floor_1hop    - HTTP -> proxy -> a bare Starlette ingress that streams one chunk itself (no second deployment)
  http_only     - the same Starlette app under plain uvicorn, no Ray (what HTTP + the client cost on this box)
  ours_http_direct_ingress - only with Ray Serve's direct ingress on (RAY_SERVE_THROUGHPUT_OPTIMIZED=1): the real
                  app over HTTP straight to the Ingress replica's own server, no proxy (what HAProxy would target)

For ``ours_*`` the overhead of a request is its client-side time to first token minus the engine's own time to
first token for that request (``timings.ttft_ms``: from submission to the first sampled token), so prompt
processing speed, which drifts on this VM, cancels out. For the floors it is the whole client-side time. Prints
one JSON object with the medians.

    python bench/bench_overhead.py [--samples 31]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from tests.support.gguf_factory import BENCH_SPEC, write_gguf  # noqa: E402

MAX_TOKENS = int(os.environ.get("BENCH_MAX_TOKENS", "4"))  # 1: the engine goes idle right after the first token
CHUNK = 'data: {"choices":[{"index":0,"text":" x","finish_reason":null}]}\n\n'


def floor_app(next_item: Any = None) -> Starlette:
    """The shape of our ingress with nothing in it: read the JSON body, get the first item, stream it."""

    async def completions(request: Request) -> StreamingResponse:
        await request.json()
        first = await next_item() if next_item else CHUNK

        async def body() -> Any:
            yield first
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])


def deploy_floors(low_latency: bool) -> None:
    from ray import serve

    from serve_app.builder import LOW_LATENCY_ENV

    # The floors get the same Ray Serve settings as our token path (main-loop user code, gRPC by value), so the
    # difference between ``ours_http`` and ``floor_http`` is our code, not configuration.
    opts: dict[str, Any] = {"num_cpus": 0}
    if low_latency:
        opts["runtime_env"] = {"env_vars": LOW_LATENCY_ENV}

    @serve.deployment(ray_actor_options=opts)
    class Echo:
        async def generate(self, body: dict[str, Any]) -> Any:
            yield CHUNK

    @serve.deployment(ray_actor_options=opts)
    @serve.ingress(floor_app())
    class OneHop:
        pass

    @serve.deployment(ray_actor_options=opts)
    @serve.ingress()
    class TwoHop:
        def __init__(self, handle: Any) -> None:
            self.handle = handle.options(_by_reference=False) if low_latency else handle

        def __serve_build_asgi_app__(self) -> Starlette:
            async def first() -> str:
                item: str = await self.handle.options(stream=True).generate.remote({}).__anext__()
                return item

            return floor_app(first)

    serve.run(OneHop.bind(), name="floor1", route_prefix="/floor1")
    serve.run(TwoHop.bind(Echo.bind()), name="floor2", route_prefix="/floor2")


def start_plain_uvicorn(port: int) -> None:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(floor_app(), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()


async def measure(base: str, plain: str, handle: Any, samples: int, direct: str | None) -> dict[str, Any]:
    import httpx

    body = {"prompt": "the quick brown fox jumps over a lazy dog", "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True}
    client = httpx.AsyncClient(timeout=60)

    async def http_first(url: str, engine_ttft: bool) -> float:
        t0 = time.perf_counter()
        first = 0.0
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{url}: HTTP {r.status_code} {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not first and line.startswith("data: {") and '"text":"' in line and '"text":""' not in line:
                    first = time.perf_counter() - t0
                    if not engine_ttft:
                        return first * 1e3
                if '"timings"' in line:
                    return first * 1e3 - json.loads(line[6:])["timings"]["ttft_ms"]
        raise RuntimeError(f"no token from {url}")

    async def handle_first() -> float:
        t0 = time.perf_counter()
        first = 0.0
        async for chunk in handle.options(stream=True).openai_stream.remote("/v1/completions", body):
            if not first and isinstance(chunk, str) and '"text":"' in chunk and '"text":""' not in chunk:
                first = time.perf_counter() - t0
            if isinstance(chunk, str) and '"timings"' in chunk:
                return first * 1e3 - json.loads(chunk[6:])["timings"]["ttft_ms"]
        raise RuntimeError("no token through the handle")

    paths = {
        "ours_http": lambda: http_first(f"{base}/v1/completions", True),
        "ours_handle": handle_first,
        "floor_http": lambda: http_first(f"{base}/floor2/v1/completions", False),
        "floor_1hop": lambda: http_first(f"{base}/floor1/v1/completions", False),
        "http_only": lambda: http_first(f"{plain}/v1/completions", False),
    }
    if direct:
        paths["ours_http_direct_ingress"] = lambda: http_first(f"{direct}/v1/completions", True)
    for f in paths.values():
        for _ in range(3):
            await f()
    res: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(samples):
        for k, f in paths.items():
            await asyncio.sleep(0.1)
            res[k].append(await f())
    await client.aclose()
    return {k: round(statistics.median(v), 2) for k, v in res.items()}


def direct_ingress_port() -> int | None:
    """With Ray Serve's direct ingress on (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``), each ingress replica also serves
    HTTP itself on a port from 30000 up (what HAProxy targets): find ours by its /health answer."""
    import httpx

    for port in range(30000, 30016):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).json() == {"status": "ok"}:
                return port
        except (httpx.HTTPError, ValueError):
            continue
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF to use (default: write the ~150M F16 bench model)")
    ap.add_argument("--samples", type=int, default=31)
    ap.add_argument("--no-low-latency", action="store_true",
                    help="Ray Serve's default settings everywhere (server.low_latency: false), for comparison")
    a = ap.parse_args()
    import httpx
    import ray
    from ray import serve

    from serve_app.builder import build_app

    path = a.model or write_gguf(Path(tempfile.mkdtemp(prefix="bench-")) / "bench-150m-F16.gguf", BENCH_SPEC)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = 18000 + os.getpid() % 1000
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model": {"filename": path}, "cache_dir": tempfile.mkdtemp(prefix="bench-vol-"), "accelerator": "auto",
            "engine": {"n_parallel": 8, "n_ctx_per_slot": 512, "flash_attn": "on"},
            "server": {"low_latency": not a.no_low_latency}}
    serve.run(build_app(args), name="llm", route_prefix="/")
    deploy_floors(not a.no_low_latency)
    base = f"http://127.0.0.1:{port}"
    while httpx.get(f"{base}/ready", timeout=30).status_code != 200:
        time.sleep(0.2)
    start_plain_uvicorn(port + 1)
    time.sleep(1)
    direct = direct_ingress_port()
    handle = serve.get_app_handle("llm")  # as the RunPod worker calls it
    handle = handle if a.no_low_latency else handle.options(_by_reference=False)
    res = asyncio.run(measure(base, f"http://127.0.0.1:{port + 1}", handle, a.samples,
                              f"http://127.0.0.1:{direct}" if direct else None))
    env = {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE")}
    out = {"what": "time to first token added on top of the engine, ms, p50, idle server", "samples": a.samples,
           "cpu_count": os.cpu_count(), "low_latency": not a.no_low_latency, "max_tokens": MAX_TOKENS,
           "ray_serve_env": env, **res,
           "ours_minus_floor_http": round(res["ours_http"] - res["floor_http"], 2)}
    print(json.dumps(out, indent=2), flush=True)
    try:
        serve.shutdown()
    except RuntimeError:  # with the router on the caller's loop (throughput mode), that loop is already closed
        pass
    ray.shutdown()


if __name__ == "__main__":
    main()
