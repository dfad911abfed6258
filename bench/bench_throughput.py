#!/usr/bin/env python3
"""Aggregate completion tokens/s at 1..32 concurrent requests, side by side in one process, on one model:

  (a) engine   - our continuous-batching engine called directly (no Ray, no HTTP)
  (b) http     - the full graph: HTTP -> Ray Serve ingress -> LlamaModel -> engine
  (c) baseline - llama_cpp.Llama, the requests one after another (what a Python server does today)

plus the time-to-first-token overhead of Ray + HTTP over the engine (p50, sequential streaming requests).
Prints one JSON object. Ratios are only meaningful within one run (same machine load).

    python bench/bench_throughput.py                    # ~150M F16 model written on the fly
    python bench/bench_throughput.py --model x.gguf --concurrency 1 8 --tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_app.config import EngineConfig  # noqa: E402
from serve_app.engine import Delta, Finished, load_engine, open_stream  # noqa: E402
from serve_app.schemas import SamplingParams  # noqa: E402
from tests.support.gguf_factory import BENCH_SPEC, write_gguf  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly brew potions".split()


def prompts(n: int) -> list[str]:
    return [f"[{i}] " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(8 + (i * 5) % 24)) for i in range(n)]


FLASH = os.environ.get("BENCH_FLASH_ATTN", "off")


def engine_cfg(max_conc: int, threads: int) -> EngineConfig:
    return EngineConfig(n_parallel=max_conc, n_ctx_per_slot=512, n_batch=512, n_ubatch=512, prefill_chunk=256,
                        flash_attn=FLASH, n_threads=threads, max_queue=64)


# ---- (a) engine ------------------------------------------------------------------------------------------------


def bench_engine(model_path: str, levels: list[int], tokens: int, threads: int, ttft_n: int) -> dict[str, Any]:
    eng, model, _ = load_engine(model_path, engine_cfg(max(levels), threads), want_gpu=True)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)

    async def one(i: int, p: str, n_tok: int = tokens, stream: bool = False) -> tuple[int, float]:
        t0 = time.perf_counter()
        s = open_stream(eng, f"r{i}-{time.perf_counter_ns()}", model.tokenize(p, True, False),
                        params.model_copy(update={"max_tokens": n_tok}), stream=stream)
        first = 0.0
        async for ev in s.events():
            if isinstance(ev, Delta) and not first:
                first = time.perf_counter() - t0
            if isinstance(ev, Finished):
                return ev.usage.completion_tokens, first
        raise RuntimeError("no result")

    async def level(n: int) -> float:
        t0 = time.perf_counter()
        outs = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts(n))])
        return sum(o[0] for o in outs) / (time.perf_counter() - t0)

    async def main() -> dict[str, Any]:
        await one(0, "warm up", 4)
        res = {str(n): round(await level(n), 1) for n in levels}
        ttft = [(await one(i, p, 4, stream=True))[1] * 1e3 for i, p in enumerate(prompts(ttft_n))]
        return {"tok_s": res, "ttft_ms_p50": round(statistics.median(ttft), 2)}

    try:
        return asyncio.run(main())
    finally:
        eng.shutdown()
        model.close()


# ---- (c) baseline -------------------------------------------------------------------------------------------------


def bench_baseline(model_path: str, levels: list[int], tokens: int, threads: int) -> dict[str, Any]:
    from llama_cpp import Llama

    llm = Llama(model_path, n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads, flash_attn=FLASH == "on",
                verbose=False, n_gpu_layers=-1)
    no_eos = {llm.token_eos(): -1e9, 2: -1e9, 4: -1e9}
    llm.create_completion("warm up", max_tokens=4, temperature=0)
    res = {}
    for n in levels:
        t0 = time.perf_counter()
        toks = 0
        for p in prompts(n):
            r = llm.create_completion(p, max_tokens=tokens, temperature=0, logit_bias=no_eos)
            toks += r["usage"]["completion_tokens"]
        res[str(n)] = round(toks / (time.perf_counter() - t0), 1)
    del llm
    return {"tok_s": res}


# ---- (b) through HTTP --------------------------------------------------------------------------------------------


def bench_http(model_path: str, levels: list[int], tokens: int, threads: int, ttft_n: int) -> dict[str, Any]:
    import httpx
    import ray
    from ray import serve

    from serve_app.builder import build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = 18000 + os.getpid() % 1000
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    vol = tempfile.mkdtemp(prefix="bench-vol-")
    cfg = engine_cfg(max(levels), threads)
    args = {"model": {"filename": model_path}, "cache_dir": vol, "accelerator": "auto",
            "engine": cfg.model_dump(exclude_defaults=True) | {"n_parallel": max(levels)}}
    serve.run(build_app(args), name="llm", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    while httpx.get(f"{base}/ready", timeout=30).status_code != 200:
        time.sleep(0.2)
    body = {"max_tokens": tokens, "temperature": 0, "ignore_eos": True}

    async def main() -> dict[str, Any]:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as c:
            async def one(p: str) -> int:
                r = await c.post("/v1/completions", json={**body, "prompt": p})
                r.raise_for_status()
                return int(r.json()["usage"]["completion_tokens"])

            async def first_token(p: str) -> float:
                t0 = time.perf_counter()
                async with c.stream("POST", "/v1/completions", json={**body, "prompt": p, "max_tokens": 4,
                                                                       "stream": True}) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {") and '"text":"' in line and '"text":""' not in line:
                            return (time.perf_counter() - t0) * 1e3
                raise RuntimeError("no token")

            await one("warm up")
            res = {}
            for n in levels:
                t0 = time.perf_counter()
                toks = sum(await asyncio.gather(*[one(p) for p in prompts(n)]))
                res[str(n)] = round(toks / (time.perf_counter() - t0), 1)
            ttft = [await first_token(p) for p in prompts(ttft_n)]
            return {"tok_s": res, "ttft_ms_p50": round(statistics.median(ttft), 2)}

    try:
        return asyncio.run(main())
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF to use (default: write the ~150M F16 bench model)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--tokens", type=int, default=64, help="completion tokens per request (EOS ignored)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--ttft-samples", type=int, default=15)
    ap.add_argument("--skip", nargs="*", default=[], choices=["engine", "http", "baseline"])
    a = ap.parse_args()
    path = a.model or write_gguf(Path(tempfile.mkdtemp(prefix="bench-")) / "bench-150m-F16.gguf", BENCH_SPEC)
    out: dict[str, Any] = {"model": os.path.basename(path), "size_mb": round(os.path.getsize(path) / 2**20, 1),
                           "tokens_per_request": a.tokens, "threads": a.threads, "cpu_count": os.cpu_count()}
    if "baseline" not in a.skip:
        out["baseline_sequential_llama"] = bench_baseline(path, a.concurrency, a.tokens, a.threads)
    if "engine" not in a.skip:
        out["engine"] = bench_engine(path, a.concurrency, a.tokens, a.threads, a.ttft_samples)
    if "http" not in a.skip:
        out["http_ingress"] = bench_http(path, a.concurrency, a.tokens, a.threads, a.ttft_samples)
    base = out.get("baseline_sequential_llama", {}).get("tok_s", {})
    for key in ("engine", "http_ingress"):
        if key in out and base:
            out[key]["x_baseline"] = {n: round(v / base[n], 2) for n, v in out[key]["tok_s"].items() if base.get(n)}
    if "engine" in out and "http_ingress" in out:
        out["ttft_overhead_ms_p50"] = round(out["http_ingress"]["ttft_ms_p50"] - out["engine"]["ttft_ms_p50"], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
