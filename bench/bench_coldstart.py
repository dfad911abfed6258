#!/usr/bin/env python3
"""Warm start (model already verified on the volume) vs plain llama-cpp-python loading the same file.

  plain_llama_load_s    llama_cpp.Llama(path) in this process (llama.cpp's own load time, the floor)
  engine_ready_s        what LlamaModel does after its constructor: ModelStore.ensure (warm: manifest + stat) +
                        load_engine (model + context + engine thread), in this process
  replica_ready_s       the replica's own "ready_s" phase through Ray Serve (constructor -> ready)
  serve_run_to_ready_s  wall clock from serve.run to /ready == 200 (adds replica process start-up)
  first_token_s         replica start -> first token served
Target: replica_ready_s <= plain_llama_load_s + 2 s. Prints one JSON object.

    python bench/bench_coldstart.py [--model x.gguf] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_app.cache.store import ModelStore  # noqa: E402
from serve_app.config import EngineConfig, ModelRef  # noqa: E402
from serve_app.engine import load_engine  # noqa: E402
from tests.support.gguf_factory import BENCH_SPEC, write_gguf  # noqa: E402


def plain_load(path: str) -> float:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(path, n_ctx=4096, n_gpu_layers=-1, verbose=False)
    dt = time.perf_counter() - t0
    del llm
    return dt


def engine_ready(path: str, volume: str) -> float:
    t0 = time.perf_counter()
    cached = ModelStore(volume).ensure(ModelRef(filename=path))
    eng, model, _ = load_engine(cached.path, EngineConfig(n_parallel=4, n_ctx_per_slot=1024), want_gpu=True)
    dt = time.perf_counter() - t0
    eng.shutdown()
    model.close()
    return dt


def through_serve(path: str, volume: str) -> dict[str, float]:
    import httpx
    import ray
    from ray import serve

    from serve_app.builder import build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = 18000 + os.getpid() % 1000
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    try:
        args = {"model": {"filename": path}, "cache_dir": volume, "accelerator": "auto",
                "engine": {"n_parallel": 4, "n_ctx_per_slot": 1024}}
        t0 = time.perf_counter()
        serve.run(build_app(args), name="llm", route_prefix="/")
        while httpx.get(f"{base}/ready", timeout=30).status_code != 200:
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
        phases = httpx.get(f"{base}/stats", timeout=30).json()["phases"]
        return {"serve_run_to_ready_s": round(wall, 3), "replica_ready_s": round(phases["ready_s"], 3),
                "replica_cache_s": round(phases["cache_s"], 4), "replica_load_s": round(phases["load_s"], 3),
                "first_token_s": round(phases.get("first_token_s", 0.0), 3)}
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    path = a.model or write_gguf(Path(tempfile.mkdtemp(prefix="bench-")) / "bench-150m-F16.gguf", BENCH_SPEC)
    volume = tempfile.mkdtemp(prefix="bench-vol-")
    ModelStore(volume).ensure(ModelRef(filename=path))  # the warm volume
    plain_load(path)  # page cache warm for everyone
    plain = statistics.median(plain_load(path) for _ in range(a.repeats))
    ours = statistics.median(engine_ready(path, volume) for _ in range(a.repeats))
    out = {"model": os.path.basename(path), "size_mb": round(os.path.getsize(path) / 2**20, 1),
           "plain_llama_load_s": round(plain, 3), "engine_ready_s": round(ours, 3),
           "engine_overhead_s": round(ours - plain, 3)}
    out.update(through_serve(path, volume))
    out["target_met"] = out["replica_ready_s"] <= plain + 2.0
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
