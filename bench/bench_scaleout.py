#!/usr/bin/env python3
"""Aggregate completion tokens/s of 1 vs 2 LlamaModel replicas (one llama.cpp thread each) on the same machine,
side by side: two applications of the full graph (HTTP -> Ingress -> LlamaModel) are deployed at once, ``one``
with one replica and ``two`` with two, identical otherwise, and measured interleaved under the same offered load,
the order rotated each repetition, best of ``--reps``. Target: two / one >= 1.8 on a machine with at least two
free cores. Prints one JSON object.

The load (``--loads``): ``waves`` of ``--concurrency`` requests sent at once (the default), and/or ``closed``:
``--concurrency`` users that each send their next request as soon as the previous one returned, until
``--requests`` are done; several loads are measured interleaved (``by_load``). ``--stream`` asks for SSE streams
(every token relayed by the Ingress and the proxy). ``two_requests_per_replica``: how the ``two`` app's router
split each wave (or the whole closed-loop run) over its replicas, in the best run.

``--ceiling`` also measures, in the same run, what this machine allows without Ray: the same engine (same model,
slots, one thread) in one process alone, then in two processes at once, each driven directly (no HTTP) with the
same load a replica gets (all of it alone, half of it each for two): ``ceiling_two_over_one`` is the best ratio
the box can give. ``cpu_s_per_1k_tokens`` splits the CPU time every process of the run spent during the measured
windows (replicas, Ingress, proxy, the client) per 1000 completion tokens: what the Ray path costs next to the
engine.

    python bench/bench_scaleout.py                        # ~150M F16 model written on the fly (BENCH_SPEC)
    python bench/bench_scaleout.py --small --reps 3       # a ~25M model: shorter run, same shape of result
    python bench/bench_scaleout.py --small --loads waves closed --ceiling
    python bench/bench_scaleout.py --large --requests 16 --tokens 32 --ceiling   # ~250M: compute-heavier
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.gguf_factory import BENCH_SPEC, ModelSpec, write_gguf  # noqa: E402

SMALL_SPEC = ModelSpec(n_layer=6, n_embd=512, n_head=8, n_head_kv=4, n_ff=1536, ctx=2048, name="bench-25m")
# About twice BENCH_SPEC's work per token: per-request costs of the Ray path weigh less next to it.
LARGE_SPEC = ModelSpec(n_layer=16, n_embd=1024, n_head=16, n_head_kv=4, n_ff=4096, ctx=2048, name="bench-250m")
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly brew potions".split()
Send = Callable[[int], Awaitable[int]]


def engine_args(slots: int) -> dict[str, Any]:
    return {"n_parallel": slots, "n_ctx_per_slot": 512, "n_threads": 1, "max_queued_requests": 256,
            "flash_attn": "on"}


def app_args(model: str, volume: str, replicas: int, slots: int) -> dict[str, Any]:
    return {"model": {"filename": model}, "cache_dir": volume, "accelerator": "cpu", "engine": engine_args(slots),
            "replicas": {"num_replicas": replicas}}


def prompt(i: int) -> str:
    return f"[{i}] " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(12))


async def offered_load(send: Send, concurrency: int, requests: int, closed_loop: bool) -> int:
    """Completion tokens of ``requests`` requests: in waves of ``concurrency``, or ``concurrency`` closed-loop
    users. Results are collected in a list: ``total += await ...`` in a coroutine reads ``total`` before the
    await and loses every other user's tokens counted meanwhile."""
    done: list[int] = []
    if closed_loop:
        ids = itertools.count()

        async def user() -> None:
            while (i := next(ids)) < requests:
                done.append(await send(i))

        await asyncio.gather(*(user() for _ in range(concurrency)))
    else:
        for start in range(0, requests, concurrency):
            n = min(concurrency, requests - start)
            done.extend(await asyncio.gather(*(send(start + i) for i in range(n))))
    return sum(done)


async def http_throughput(base: str, prefix: str, concurrency: int, requests: int, tokens: int,
                          closed_loop: bool, stream: bool) -> tuple[float, dict[int, str]]:
    """Completion tokens/s of the full graph under the offered load, and the replica that served each request."""
    import httpx

    body = {"max_tokens": tokens, "ignore_eos": True, "temperature": 0}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        async def send(i: int) -> int:
            if not stream:
                r = await client.post(f"{prefix}/v1/completions", json={**body, "prompt": prompt(i)})
                r.raise_for_status()
                served[i] = r.json()["timings"]["replica"]
                return int(r.json()["usage"]["completion_tokens"])
            req = {**body, "prompt": prompt(i), "stream": True, "stream_options": {"include_usage": True}}
            n = 0
            async with client.stream("POST", f"{prefix}/v1/completions", json=req) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and '"usage":{' in line:
                        n = int(json.loads(line[6:])["usage"]["completion_tokens"])
                    elif line.startswith("data: {") and '"timings":{' in line:  # the finish chunk
                        served[i] = json.loads(line[6:])["timings"]["replica"]
            return n

        served: dict[int, str] = {}
        t0 = time.perf_counter()
        total = await offered_load(send, concurrency, requests, closed_loop)
        return total / (time.perf_counter() - t0), served


def split(served: dict[int, str], concurrency: int, closed_loop: bool) -> list[list[int]]:
    """Requests per replica (most first): per wave, or over the whole closed-loop run."""
    groups: dict[int, list[str]] = {}
    for i, replica in served.items():
        groups.setdefault(0 if closed_loop else i // concurrency, []).append(replica)
    return [sorted(Counter(g).values(), reverse=True) for _, g in sorted(groups.items())]


# ---- the no-Ray ceiling: engines in plain processes ----------------------------------------------------------


def engine_worker(model: str, slots: int) -> None:
    """One engine in this process, driven directly; per line read from stdin ("users requests tokens closed"),
    one measurement, answered with one JSON line (wall-clock start and end, so two processes can be added up)."""
    from serve_app.config import EngineConfig
    from serve_app.engine import load_engine, open_stream
    from serve_app.protocol import Done, SamplingParams

    eng, handle, _ = load_engine(model, EngineConfig(**engine_args(slots)), want_gpu=False)

    async def run(users: int, requests: int, tokens: int, closed: bool) -> dict[str, float]:
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)

        async def send(i: int) -> int:
            s = open_stream(eng, f"r{i}", handle.tokenize(prompt(i), True, False), params, False)
            async for ev in s.events():
                if isinstance(ev, Done):
                    return ev.usage.completion_tokens
            raise RuntimeError("the engine ended a request without a result")

        t0 = time.time()
        n = await offered_load(send, users, requests, closed)
        return {"tokens": n, "t0": t0, "t1": time.time()}

    print("ready", flush=True)
    for line in sys.stdin:
        users, requests, tokens, closed = (int(x) for x in line.split())
        print(json.dumps(asyncio.run(run(users, requests, tokens, bool(closed)))), flush=True)
    eng.shutdown()


class Ceiling:
    """Two engine processes, loaded once; ``measure(k)`` drives the first ``k`` of them at once."""

    def __init__(self, model: str, slots: int) -> None:
        cmd = [sys.executable, __file__, "--engine-worker", "--model", model, "--slots", str(slots)]
        self.procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                       text=True) for _ in range(2)]
        for p in self.procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("an engine process failed to load")

    def measure(self, k: int, users: int, requests: int, tokens: int, closed: bool) -> float:
        """Aggregate tokens/s of ``k`` engines at once, each with 1/k of the load."""
        for p in self.procs[:k]:
            assert p.stdin is not None
            p.stdin.write(f"{max(1, users // k)} {max(1, requests // k)} {tokens} {int(closed)}\n")
            p.stdin.flush()
        res = [json.loads(p.stdout.readline()) for p in self.procs[:k] if p.stdout is not None]
        return sum(r["tokens"] for r in res) / (max(r["t1"] for r in res) - min(r["t0"] for r in res))

    def close(self) -> None:
        for p in self.procs:
            if p.stdin is not None:
                p.stdin.close()
            p.wait(30)


# ---- CPU accounting ------------------------------------------------------------------------------------------


def cpu_times() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of this process (the client) and of every Ray process, by pid, with the process's role
    (the engine processes of ``--ceiling`` have exited by then)."""
    import psutil

    out: dict[int, tuple[str, float]] = {}
    for p in psutil.process_iter(["cmdline", "cpu_times"]):
        cmd = " ".join(p.info["cmdline"] or ())
        if p.pid == os.getpid():
            role = "client"
        elif cmd.startswith("ray::ServeReplica:"):
            # The title names the method running now ("...:LlamaModel.handle_request"): keep app:Deployment.
            role = cmd.split()[0].removeprefix("ray::ServeReplica:").split(".")[0]
        elif cmd.startswith("ray::ProxyActor"):
            role = "proxy"
        elif cmd.startswith("ray::"):
            role = "ray_other"  # the Serve controller, idle workers
        elif "raylet" in cmd or "gcs_server" in cmd or "/site-packages/ray/" in cmd:
            role = "ray_system"  # raylet, GCS, agents
        else:
            continue
        t = p.info["cpu_times"]
        if t is not None:
            out[p.pid] = (role, t.user + t.system)
    return out


def cpu_split(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
              tokens: float) -> dict[str, float]:
    """CPU seconds per 1000 tokens by role between two snapshots, process by process (a process started in
    between counts whole)."""
    by_role: dict[str, float] = {}
    for pid, (role, cpu) in after.items():
        by_role[role] = by_role.get(role, 0.0) + cpu - before.get(pid, (role, 0.0))[1]
    return {k: round(v / tokens * 1e3, 3) for k, v in sorted(by_role.items()) if v > 0.005}


# ---- main ----------------------------------------------------------------------------------------------------


def wait_ready(url: str, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while httpx.get(url, timeout=10).status_code != 200:
        if time.time() > deadline:
            raise TimeoutError(url)
        time.sleep(0.5)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="a GGUF file; default: BENCH_SPEC (or --small) written on the fly")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="a ~25M model instead of the ~150M bench model")
    size.add_argument("--large", action="store_true", help="a ~250M model instead of the ~150M bench model")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--slots", type=int, default=8, help="n_parallel of each replica")
    ap.add_argument("--requests", type=int, default=32, help="requests per measurement")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--loads", nargs="+", choices=["waves", "closed"], default=["waves"],
                    help="offered loads, measured interleaved; the first one fills the top-level fields")
    ap.add_argument("--closed-loop", action="store_true", help="the same as --loads closed")
    ap.add_argument("--stream", action="store_true", help="SSE streams instead of one JSON answer per request")
    ap.add_argument("--ceiling", action="store_true", help="also 1 vs 2 engines in plain processes (no Ray)")
    ap.add_argument("--engine-worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.closed_loop:
        a.loads = ["closed"]
    return a


def rotations(reps: int, keys: list[str]) -> list[str]:
    """Every key once per repetition, the order rotated each time (this VM's speed drifts between minutes)."""
    return [k for rep in range(reps) for k in keys[rep % len(keys):] + keys[:rep % len(keys)]]


def summary(runs: dict[str, list[float]], one: str, two: str, prefix: str = "") -> dict[str, Any]:
    best = {k: max(v) for k, v in runs.items()}
    label = "engine" if prefix else "replica"
    return {f"{prefix}one_{label}_tok_s": round(best[one], 1), f"{prefix}two_{label}s_tok_s": round(best[two], 1),
            f"{prefix}two_over_one": round(best[two] / best[one], 2)}


def measure_ceiling(a: argparse.Namespace, model: str) -> dict[str, Any]:
    """1 vs 2 engines without Ray, each load, interleaved."""
    runs: dict[str, list[float]] = {}
    eng = Ceiling(model, a.slots)
    try:
        eng.measure(2, a.concurrency, a.concurrency, 8, False)  # warm both
        for key in rotations(a.reps, [f"{n}/{load}" for load in a.loads for n in ("one", "two")]):
            n, load = key.split("/")
            rate = eng.measure(1 if n == "one" else 2, a.concurrency, a.requests, a.tokens, load == "closed")
            runs.setdefault(key, []).append(rate)
    finally:
        eng.close()
    first = a.loads[0]
    out = summary(runs, f"one/{first}", f"two/{first}", "ceiling_")
    if len(a.loads) > 1:
        out["ceiling_by_load"] = {load: summary(runs, f"one/{load}", f"two/{load}", "ceiling_") for load in a.loads}
    out["ceiling_runs_tok_s"] = {k: [round(x, 1) for x in v] for k, v in runs.items()}
    return out


def measure_http(a: argparse.Namespace, base: str) -> dict[str, Any]:
    """Both apps under each load, interleaved; CPU split of each key's best run."""
    for name in ("two", "one"):  # warm both replicas' paths
        asyncio.run(http_throughput(base, f"/{name}", a.concurrency, a.concurrency, 8, False, a.stream))
    runs: dict[str, list[float]] = {}
    cpu: dict[str, dict[str, float]] = {}
    spread: dict[str, list[list[int]]] = {}
    for key in rotations(a.reps, [f"{n}/{load}" for load in a.loads for n in ("one", "two")]):
        n, load = key.split("/")
        closed = load == "closed"
        before = cpu_times()
        rate, served = asyncio.run(http_throughput(base, f"/{n}", a.concurrency, a.requests, a.tokens, closed,
                                                   a.stream))
        runs.setdefault(key, []).append(rate)
        if rate >= max(runs[key]):
            cpu[key] = cpu_split(before, cpu_times(), a.requests * a.tokens)
            if n == "two":
                spread[key] = split(served, a.concurrency, closed)
    first = a.loads[0]
    out = summary(runs, f"one/{first}", f"two/{first}")
    if len(a.loads) > 1:
        out["by_load"] = {load: summary(runs, f"one/{load}", f"two/{load}") for load in a.loads}
    return out | {"runs_tok_s": {k: [round(x, 1) for x in v] for k, v in runs.items()},
                  "two_requests_per_replica": spread, "cpu_s_per_1k_tokens": cpu}


def main() -> None:
    a = parse()
    if a.engine_worker:
        engine_worker(a.model, a.slots)
        return

    import ray
    from ray import serve

    from serve_app.builder import build_app
    from tests.conftest import free_port

    tmp = tempfile.mkdtemp(prefix="bench-scaleout-")
    spec = SMALL_SPEC if a.small else LARGE_SPEC if a.large else BENCH_SPEC
    model = a.model or write_gguf(os.path.join(tmp, f"{spec.name}.gguf"), spec)
    out: dict[str, Any] = {
        "model": os.path.basename(model), "threads_per_replica": 1, "slots_per_replica": a.slots,
        "loads": a.loads, "stream": a.stream, "concurrency": a.concurrency, "requests": a.requests,
        "tokens_per_request": a.tokens, "cpus": os.cpu_count()}
    ceiling = measure_ceiling(a, model) if a.ceiling else {}  # before Ray starts: nothing else runs on the box
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for name, n in (("one", 1), ("two", 2)):
            serve.run(build_app(app_args(model, os.path.join(tmp, "volume"), n, a.slots)), name=name,
                      route_prefix=f"/{name}", blocking=False)
        for name in ("one", "two"):
            wait_ready(f"http://127.0.0.1:{port}/{name}/ready")
        print(json.dumps(out | measure_http(a, f"http://127.0.0.1:{port}") | ceiling, indent=2))
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
