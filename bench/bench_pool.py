#!/usr/bin/env python3
"""What on-demand loading costs (``max_models_per_replica``): time to the first token of a request whose model the
replica holds vs one whose model it must load first (unloading the other: the replica holds one), measured side by
side on one app of the full graph (HTTP -> Ingress -> pooled LlamaModel), interleaved, median of ``--requests``.
Also the swap itself, from the replica's own load timings. Prints one JSON object.

    python bench/bench_pool.py                  # two ~150M F16 models written on the fly (BENCH_SPEC, two seeds)
    python bench/bench_pool.py --model A.gguf --model B.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.gguf_factory import BENCH_SPEC, write_gguf  # noqa: E402


def ttft_ms(base: str, model: str) -> float:
    """Milliseconds from sending a streamed completion to its first content chunk."""
    import httpx

    body = {"model": model, "prompt": "the quick brown fox jumps over", "max_tokens": 8, "stream": True,
            "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    first = None
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data: {"):
                first = (time.perf_counter() - t0) * 1000
    assert first is not None
    return first


def wait_ready(url: str, timeout: float = 600) -> None:
    import httpx

    deadline = time.time() + timeout
    while httpx.get(url, timeout=10).status_code != 200:
        if time.time() > deadline:
            raise TimeoutError(url)
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", help="a GGUF file (give two); default: BENCH_SPEC, two seeds")
    ap.add_argument("--requests", type=int, default=5, help="measurements of each kind")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import ray
    from ray import serve

    from serve_app.builder import build_app
    from tests.conftest import free_port

    tmp = tempfile.mkdtemp(prefix="bench-pool-")
    models = a.model or [write_gguf(os.path.join(tmp, f"pool-{s}.gguf"), replace(BENCH_SPEC, seed=s))
                         for s in (1, 2)]
    if len(models) != 2:
        raise SystemExit("give two --model files")
    names = ["one", "two"]
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    args: dict[str, Any] = {
        "models": [{"filename": m, "name": n} for m, n in zip(models, names, strict=True)],
        "max_models_per_replica": 1, "cache_dir": os.path.join(tmp, "volume"), "accelerator": "cpu",
        "engine": {"n_parallel": 4, "n_ctx_per_slot": 1024, "n_threads": a.threads},
    }
    try:
        serve.run(build_app(args), name="pool", route_prefix="/")
        wait_ready(f"{base}/ready")
        ttft_ms(base, "one")  # warm the path; the replica holds "one"
        held, swapped = [], []
        for _ in range(a.requests):
            held.append(ttft_ms(base, "one"))  # held: no load
            swapped.append(ttft_ms(base, "two"))  # unload one, load two
            held.append(ttft_ms(base, "two"))
            swapped.append(ttft_ms(base, "one"))
        print(json.dumps({
            "models": [os.path.basename(m) for m in models],
            "model_bytes": [os.path.getsize(m) for m in models], "threads": a.threads,
            "ttft_held_ms_p50": round(statistics.median(held), 1),
            "ttft_swap_ms_p50": round(statistics.median(swapped), 1),
            "swap_over_held": round(statistics.median(swapped) / statistics.median(held), 1),
            "measurements_each": len(held),
        }, indent=2))
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
