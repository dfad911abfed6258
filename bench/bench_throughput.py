#!/usr/bin/env python3
"""Aggregate completion tokens/s at 1..32 concurrent requests, side by side in one process, on one model:

  engine    - our continuous-batching engine called directly (no Ray, no HTTP)
  http      - the full graph: HTTP -> Ray Serve ingress -> LlamaModel -> engine
  baseline  - llama_cpp.Llama, the requests one after another (what a Python server does today)

plus time to first token (p50 of sequential streaming requests) through the engine and through HTTP, and the Ray +
HTTP overhead ``ttft_overhead_ms_p50``: each HTTP request's client-side TTFT minus the engine's own TTFT for that
same request, p50. (The difference of the two medians is not used: prompt processing on this VM varies between
samples by more than the overhead. ``bench_overhead.py`` breaks the overhead down.) All three are loaded at once and measured interleaved, level by level, with
the order rotated each repetition, best of ``BENCH_REPS``: this 2-core VM's speed drifts by up to 2x between
minutes, so only numbers taken side by side are comparable. Prints one JSON object.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_app.config import EngineConfig  # noqa: E402
from serve_app.engine import load_engine, open_stream  # noqa: E402
from serve_app.protocol import Delta, Done, SamplingParams  # noqa: E402
from tests.support.gguf_factory import BENCH_SPEC, write_gguf  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly brew potions".split()
FLASH = os.environ.get("BENCH_FLASH_ATTN", "on")
REPS = int(os.environ.get("BENCH_REPS", "2"))
NO_EOS = {2: -1e9, 4: -1e9}  # the synthetic vocab's </s> and <|im_end|>


def prompts(n: int, salt: int = 0) -> list[str]:
    # ``salt`` changes the first token so llama_cpp.Llama's single-sequence prefix cache never reuses a prompt.
    return [f"[{i}.{salt}] " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(8 + (i * 5) % 24))
            for i in range(n)]


def engine_cfg(max_conc: int, threads: int) -> EngineConfig:
    return EngineConfig(n_parallel=max_conc, n_ctx_per_slot=512, n_batch=512, n_ubatch=512, prefill_chunk=256,
                        flash_attn=FLASH, n_threads=threads, max_queued_requests=64)


class Baseline:
    def __init__(self, path: str, threads: int, tokens: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(path, n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads,
                         flash_attn=FLASH == "on", verbose=False, n_gpu_layers=-1)
        self.tokens = tokens

    async def level(self, ps: list[str]) -> int:
        toks = 0
        for p in ps:  # one after another: Llama serves one sequence at a time
            r = self.llm.create_completion(p, max_tokens=self.tokens, temperature=0, repeat_penalty=1.0,
                                           logit_bias=NO_EOS)
            toks += r["usage"]["completion_tokens"]
        return toks


class DirectEngine:
    def __init__(self, path: str, max_conc: int, threads: int, tokens: int) -> None:
        self.eng, self.model, _ = load_engine(path, engine_cfg(max_conc, threads), want_gpu=True)
        self.params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        self.step_ms: dict[str, dict[str, float]] = {}

    async def one(self, p: str, stream: bool = False, max_tokens: int | None = None) -> tuple[int, float]:
        t0 = time.perf_counter()
        params = self.params if max_tokens is None else self.params.model_copy(update={"max_tokens": max_tokens})
        s = open_stream(self.eng, f"r{time.perf_counter_ns()}", self.model.tokenize(p, True, False), params, stream)
        first = 0.0
        async for ev in s.events():
            if isinstance(ev, Delta) and ev.text and not first:
                first = time.perf_counter() - t0
            if isinstance(ev, Done):
                return ev.usage.completion_tokens, first
        raise RuntimeError("no result")

    async def level(self, ps: list[str]) -> int:
        before = self.eng.stats()
        toks = sum(n for n, _ in await asyncio.gather(*[self.one(p) for p in ps]))
        await asyncio.sleep(0.05)  # let the engine thread close the step that delivered the last result
        after = self.eng.stats()
        steps = max(1, after.steps - before.steps)
        decode, sample = after.decode_s - before.decode_s, after.sample_s - before.sample_s
        other = after.busy_s - before.busy_s - decode - sample
        # Per engine step, measured by the engine itself: what the step time is spent on.
        self.step_ms[str(len(ps))] = {"steps": steps, "decode": round(decode / steps * 1e3, 3),
                                      "sample": round(sample / steps * 1e3, 3), "python": round(other / steps * 1e3, 3)}
        return toks

    async def ttft_ms(self, p: str) -> float:
        return (await self.one(p, stream=True, max_tokens=4))[1] * 1e3


class Http:
    def __init__(self, path: str, max_conc: int, threads: int, tokens: int) -> None:
        import httpx
        import ray
        from ray import serve

        from serve_app.builder import build_app

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
        port = 18000 + os.getpid() % 1000
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        engine = engine_cfg(max_conc, threads).model_dump(exclude_defaults=True) | {"n_parallel": max_conc}
        args = {"model": {"filename": path}, "cache_dir": tempfile.mkdtemp(prefix="bench-vol-"),
                "accelerator": "auto", "engine": engine}
        serve.run(build_app(args), name="llm", route_prefix="/")
        self.base = f"http://127.0.0.1:{port}"
        while httpx.get(f"{self.base}/ready", timeout=30).status_code != 200:
            time.sleep(0.2)
        self.body = {"max_tokens": tokens, "temperature": 0, "ignore_eos": True}
        self.client: Any = None

    async def _c(self) -> Any:
        import httpx

        if self.client is None:
            limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
            self.client = httpx.AsyncClient(base_url=self.base, timeout=600, limits=limits)
        return self.client

    async def level(self, ps: list[str]) -> int:
        c = await self._c()

        async def one(p: str) -> int:
            r = await c.post("/v1/completions", json={**self.body, "prompt": p})
            r.raise_for_status()
            return int(r.json()["usage"]["completion_tokens"])

        return sum(await asyncio.gather(*[one(p) for p in ps]))

    async def ttft_ms(self, p: str) -> float:
        return (await self.ttft_pair(p))[0]

    async def ttft_pair(self, p: str) -> tuple[float, float]:
        """(client-side TTFT, the engine's own TTFT for the same request), both in ms."""
        c = await self._c()
        t0 = time.perf_counter()
        first = 0.0
        async with c.stream("POST", "/v1/completions", json={**self.body, "prompt": p, "max_tokens": 4,
                                                               "stream": True}) as r:
            async for line in r.aiter_lines():
                if not first and line.startswith("data: {") and '"text":"' in line and '"text":""' not in line:
                    first = (time.perf_counter() - t0) * 1e3
                if '"timings"' in line:
                    return first, float(json.loads(line[6:])["timings"]["ttft_ms"])
        raise RuntimeError("no token")

    def close(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


async def measure(paths: dict[str, Any], levels: list[int], ttft_n: int) -> dict[str, Any]:
    best: dict[str, dict[str, float]] = {k: {} for k in paths}
    names = list(paths)
    for rep in range(REPS):
        for n in levels:
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                t0 = time.perf_counter()
                toks = await paths[name].level(prompts(n, salt=rep * 1000 + n))
                rate = round(toks / (time.perf_counter() - t0), 1)
                best[name][str(n)] = max(best[name].get(str(n), 0.0), rate)
    out: dict[str, Any] = {k: {"tok_s": v} for k, v in best.items()}
    if "engine" in paths:
        out["engine"]["step_ms_last_rep"] = paths["engine"].step_ms
    for name in ("engine", "http_ingress"):
        if name in paths:
            samples = [await paths[name].ttft_ms(p) for p in prompts(ttft_n, salt=99)]
            out[name]["ttft_ms_p50"] = round(statistics.median(samples), 2)
    if "http_ingress" in paths:
        # Per request: what HTTP + Ray add on top of the engine's own time to first token for that same request,
        # so prompt-processing speed (which drifts on this VM between samples) cancels out.
        pairs = []
        for p in prompts(ttft_n, salt=77):
            await asyncio.sleep(0.1)  # an idle server: latency of the path, not queueing behind the last request
            pairs.append(await paths["http_ingress"].ttft_pair(p))
        out["ttft_overhead_ms_p50"] = round(statistics.median(c - e for c, e in pairs), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF to use (default: write the ~150M F16 bench model)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--tokens", type=int, default=64, help="completion tokens per request (EOS ignored)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--ttft-samples", type=int, default=21)
    ap.add_argument("--skip", nargs="*", default=[], choices=["engine", "http", "baseline"])
    a = ap.parse_args()
    path = a.model or write_gguf(Path(tempfile.mkdtemp(prefix="bench-")) / "bench-150m-F16.gguf", BENCH_SPEC)
    top = max(a.concurrency)
    makers: dict[str, Callable[[], Any]] = {
        "baseline_sequential_llama": lambda: Baseline(path, a.threads, a.tokens),
        "engine": lambda: DirectEngine(path, top, a.threads, a.tokens),
        "http_ingress": lambda: Http(path, top, a.threads, a.tokens),
    }
    skip = {"baseline": "baseline_sequential_llama", "engine": "engine", "http": "http_ingress"}
    paths = {k: make() for k, make in makers.items() if k not in {skip[s] for s in a.skip}}
    try:
        results = asyncio.run(measure(paths, a.concurrency, a.ttft_samples))
    finally:
        if "http_ingress" in paths:
            paths["http_ingress"].close()
    out: dict[str, Any] = {"model": os.path.basename(path), "size_mb": round(os.path.getsize(path) / 2**20, 1),
                           "tokens_per_request": a.tokens, "threads": a.threads, "cpu_count": os.cpu_count(),
                           "flash_attn": FLASH, "best_of": REPS, **results}
    base = out.get("baseline_sequential_llama", {}).get("tok_s", {})
    for key in ("engine", "http_ingress"):
        if key in out and base:
            out[key]["x_baseline"] = {n: round(v / base[n], 2) for n, v in out[key]["tok_s"].items() if base.get(n)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
