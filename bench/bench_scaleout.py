#!/usr/bin/env python3
"""Aggregate completion tokens/s of 1 vs 2 LlamaModel replicas (one llama.cpp thread each) on the same machine,
side by side: two applications of the full graph (HTTP -> Ingress -> LlamaModel) are deployed at once, ``one``
with one replica and ``two`` with two, identical otherwise, and measured interleaved under the same offered load
(waves of ``--concurrency`` requests, ``--tokens`` each), the order rotated each repetition, best of ``--reps``.
Target: two / one >= 1.8 on a machine with at least two free cores. Prints one JSON object.

    python bench/bench_scaleout.py                        # ~150M F16 model written on the fly (BENCH_SPEC)
    python bench/bench_scaleout.py --small --reps 3       # a ~25M model: shorter run, same shape of result
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.gguf_factory import BENCH_SPEC, ModelSpec, write_gguf  # noqa: E402

SMALL_SPEC = ModelSpec(n_layer=6, n_embd=512, n_head=8, n_head_kv=4, n_ff=1536, ctx=2048, name="bench-25m")
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly brew potions".split()


def app_args(model: str, volume: str, replicas: int, slots: int) -> dict[str, Any]:
    return {"model": {"filename": model}, "cache_dir": volume, "accelerator": "cpu",
            "engine": {"n_parallel": slots, "n_ctx_per_slot": 512, "n_threads": 1, "max_queued_requests": 256,
                       "flash_attn": "on"},
            "replicas": {"num_replicas": replicas}}


async def one_request(client: Any, prefix: str, i: int, tokens: int) -> int:
    prompt = f"[{i}] " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(12))
    r = await client.post(f"{prefix}/v1/completions", json={"prompt": prompt, "max_tokens": tokens,
                                                            "ignore_eos": True, "temperature": 0})
    r.raise_for_status()
    return int(r.json()["usage"]["completion_tokens"])


async def throughput(base: str, prefix: str, concurrency: int, requests: int, tokens: int) -> float:
    """Completion tokens/s over ``requests`` requests sent in waves of ``concurrency`` at once."""
    import httpx

    total = 0
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        t0 = time.perf_counter()
        for start in range(0, requests, concurrency):
            n = min(concurrency, requests - start)
            total += sum(await asyncio.gather(*(one_request(client, prefix, start + i, tokens) for i in range(n))))
        return total / (time.perf_counter() - t0)


def wait_ready(url: str, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while httpx.get(url, timeout=10).status_code != 200:
        if time.time() > deadline:
            raise TimeoutError(url)
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="a GGUF file; default: BENCH_SPEC (or --small) written on the fly")
    ap.add_argument("--small", action="store_true", help="a ~25M model instead of the ~150M bench model")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--slots", type=int, default=8, help="n_parallel of each replica")
    ap.add_argument("--requests", type=int, default=32, help="requests per measurement")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()

    import ray
    from ray import serve

    from serve_app.builder import build_app
    from tests.conftest import free_port

    tmp = tempfile.mkdtemp(prefix="bench-scaleout-")
    spec = SMALL_SPEC if a.small else BENCH_SPEC
    model = a.model or write_gguf(os.path.join(tmp, f"{spec.name}.gguf"), spec)
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    try:
        for name, n in (("one", 1), ("two", 2)):
            serve.run(build_app(app_args(model, os.path.join(tmp, "volume"), n, a.slots)), name=name,
                      route_prefix=f"/{name}", blocking=False)
        for name in ("one", "two"):
            wait_ready(f"{base}/{name}/ready")
        asyncio.run(throughput(base, "/two", a.concurrency, a.concurrency, 8))  # warm both replicas' paths
        asyncio.run(throughput(base, "/one", a.concurrency, a.concurrency, 8))
        runs: dict[str, list[float]] = {"one": [], "two": []}
        for rep in range(a.reps):
            for name in (("one", "two") if rep % 2 == 0 else ("two", "one")):
                runs[name].append(asyncio.run(throughput(base, f"/{name}", a.concurrency, a.requests, a.tokens)))
        best = {k: max(v) for k, v in runs.items()}
        print(json.dumps({
            "model": os.path.basename(model), "threads_per_replica": 1, "slots_per_replica": a.slots,
            "concurrency": a.concurrency, "requests": a.requests, "tokens_per_request": a.tokens,
            "one_replica_tok_s": round(best["one"], 1), "two_replicas_tok_s": round(best["two"], 1),
            "two_over_one": round(best["two"] / best["one"], 2), "cpus": os.cpu_count(),
            "runs_tok_s": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        }, indent=2))
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
