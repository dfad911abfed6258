#!/usr/bin/env python3
"""Prompt caching on a chat workload, side by side in one run: N users x T turns sharing one long system prompt
(1,500 tokens by default), answers of 64 tokens (greedy, ``ignore_eos``: every answer has the same length).

User 0's first turn runs alone (cold: nothing cached); then every user runs its turns concurrently (users 1.. 50 ms
apart), each turn sent when the user's previous answer is in. Then a probe on the idle server: one request with a
system prompt never seen before (cold) and one with that system prompt and another user message (warm). The same workload runs, each with its own system prompt so nothing
carries over, against:

  cache         - the full graph (HTTP -> Ingress -> LlamaModel), prompt caching on (the default)
  nocache       - the same app, every request with ``cache_prompt: false``
  cache_2_replicas  (``--replicas 2``) - a second app with two LlamaModel replicas behind the prefix-affinity router
  llama_server  (``--llama-server PATH``) - ``llama-server --cache-prompt`` on the same model, slots and threads

For each: time to first token (cold; first turns with the system prompt cached elsewhere; later turns) p50/p95,
prompt tokens computed vs reused, completion and total tokens/s over the workload's wall time, and for every
later turn its ``cached_tokens`` over the previous turn's prompt + answer. Then each target and whether it is met.
Reuse is read from ``usage.prompt_tokens_details.cached_tokens`` (0 where a server does not report it).
Prints one JSON object.

    python bench/bench_prefix.py                        # writes the 150M bench model with a 32k vocabulary
    python bench/bench_prefix.py --users 4 --turns 4 --replicas 2 --llama-server /path/to/llama-server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.gguf_factory import BENCH_SPEC_32K, write_gguf  # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly brew potions near old stone "
         "bridges under grey autumn skies").split()
TARGETS = {"warm_ttft_speedup": 5.0, "cached_vs_previous_turn": 0.9, "throughput_vs_nocache": 2.0,
           "two_replica_hit_rate_vs_one": 0.9}


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))], 1)


def cached_of(usage: dict[str, Any] | None, timings: dict[str, Any] | None) -> int:
    """Reused prompt tokens as a server reports them (OpenAI's field first, then llama-server's ``cache_n``)."""
    details = (usage or {}).get("prompt_tokens_details") or {}
    for v in (details.get("cached_tokens"), (usage or {}).get("cached_tokens"), (timings or {}).get("cache_n")):
        if isinstance(v, int):
            return v
    return 0


async def chat_turn(c: httpx.AsyncClient, messages: list[dict[str, str]], body: dict[str, Any]) -> dict[str, Any]:
    """One streamed turn: TTFT (first non-empty content), the answer, usage and the serving replica."""
    t0 = time.perf_counter()
    ttft, parts, usage, timings = None, [], None, None
    async with c.stream("POST", "/v1/chat/completions", json={**body, "messages": messages}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:500]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for ch in chunk.get("choices") or []:
                text = (ch.get("delta") or {}).get("content")
                if text:
                    ttft = ttft or time.perf_counter() - t0
                    parts.append(text)
            usage = chunk.get("usage") or usage
            timings = chunk.get("timings") or (chunk.get("choices") or [{}])[0].get("timings") or timings
    return {"ttft_ms": (ttft or time.perf_counter() - t0) * 1e3, "answer": "".join(parts), "usage": usage or {},
            "cached": cached_of(usage, timings), "replica": (timings or {}).get("replica", "")}


async def workload(base: str, system: str, users: int, turns: int, answer: int, cache: bool) -> dict[str, Any]:
    body = {"max_tokens": answer, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, "cache_prompt": cache}
    records: list[dict[str, Any]] = []
    cold_done = asyncio.Event()

    async def user(c: httpx.AsyncClient, u: int) -> None:
        if u:
            # Users arrive one after another, 50 ms apart, after the cold turn (user 0's next turn goes first).
            await cold_done.wait()
            await asyncio.sleep(0.05 * u)
        messages = [{"role": "system", "content": system}]
        for k in range(turns):
            topic = " ".join(WORDS[(u * 7 + k * 3 + i) % len(WORDS)] for i in range(10))
            messages.append({"role": "user", "content": f"user {u}, question {k}: tell me about {topic}"})
            out = await chat_turn(c, messages, body)
            records.append({"user": u, "turn": k, **{x: out[x] for x in ("ttft_ms", "cached", "replica")},
                            "prompt": out["usage"].get("prompt_tokens", 0),
                            "completion": out["usage"].get("completion_tokens", 0)})
            messages.append({"role": "assistant", "content": out["answer"]})
            if u == 0 and k == 0:
                cold_done.set()

    # No keep-alive: a server that closes idle connections (llama-server after 5 s) must not fail a turn.
    limits = httpx.Limits(max_connections=users * 2, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=1800, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*[user(c, u) for u in range(users)])
        wall = time.perf_counter() - t0
    return summarise(records, wall)


async def probe(base: str, tokens: int, salt: str, cache: bool, reps: int = 3) -> dict[str, Any]:
    """TTFT of one request alone on an idle server, for a system prompt seen for the first time (cold) and then for
    the same system prompt with another user message (warm: only the new turn is computed when caching works).
    Medians of ``reps`` fresh system prompts; the workload above mixes in other users' prefills, this does not."""
    body = {"max_tokens": 4, "temperature": 0, "ignore_eos": True, "stream": True, "cache_prompt": cache}
    cold, warm, cached = [], [], []
    # No keep-alive, as in ``workload``: llama-server drops idle connections.
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_keepalive_connections=0)) as c:
        for i in range(reps):
            system, _ = await asyncio.to_thread(system_prompt, base, tokens, f"{salt}-probe{i}")
            sys_msg = {"role": "system", "content": system}
            a = await chat_turn(c, [sys_msg, {"role": "user", "content": "what does the quick fox do"}], body)
            b = await chat_turn(c, [sys_msg, {"role": "user", "content": "where do the wizards brew"}], body)
            cold.append(a["ttft_ms"])
            warm.append(b["ttft_ms"])
            cached.append(b["cached"])
    return {"cold_ttft_ms_p50": round(statistics.median(cold), 1), "warm_ttft_ms_p50": round(statistics.median(warm), 1),
            "warm_cached_tokens": cached, "speedup": round(statistics.median(cold) / max(1e-9, statistics.median(warm)), 2)}


def summarise(records: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    by = {(r["user"], r["turn"]): r for r in records}
    cold = [r["ttft_ms"] for r in records if r["user"] == 0 and r["turn"] == 0]
    first = [r["ttft_ms"] for r in records if r["user"] > 0 and r["turn"] == 0]
    later = [r["ttft_ms"] for r in records if r["turn"] > 0]
    ratios = []
    for (u, k), r in by.items():
        prev = by.get((u, k - 1))
        if prev is not None:
            ratios.append(r["cached"] / max(1, prev["prompt"] + prev["completion"]))
    prompt = sum(r["prompt"] for r in records)
    cached = sum(r["cached"] for r in records)
    completion = sum(r["completion"] for r in records)
    replicas: dict[str, int] = {}
    for r in records:
        replicas[r["replica"]] = replicas.get(r["replica"], 0) + 1
    sticky = all(len({r["replica"] for r in records if r["user"] == u}) == 1 for u in {r["user"] for r in records})
    return {
        "requests": len(records), "wall_s": round(wall, 2),
        "ttft_ms": {"cold": pct(cold, 0.5), "first_turn_p50": pct(first, 0.5), "first_turn_p95": pct(first, 0.95),
                    "later_turns_p50": pct(later, 0.5), "later_turns_p95": pct(later, 0.95)},
        "prompt_tokens": prompt, "cached_tokens": cached, "prefill_tokens_computed": prompt - cached,
        "hit_rate": round(cached / max(1, prompt), 3),
        "completion_tokens": completion, "completion_tokens_per_s": round(completion / wall, 2),
        "total_tokens_per_s": round((prompt + completion) / wall, 1),
        "cached_vs_previous_turn": {"min": round(min(ratios), 3) if ratios else None,
                                    "p50": round(statistics.median(ratios), 3) if ratios else None},
        "requests_per_replica": replicas, "users_on_one_replica": sticky,
    }


def system_prompt(base: str, tokens: int, salt: str) -> tuple[str, int]:
    """A system prompt of about ``tokens`` tokens, counted by the server's own tokenizer (/tokenize)."""
    def count(text: str) -> int:
        r = httpx.post(f"{base}/tokenize", json={"content": text, "add_special": False}, timeout=60)
        r.raise_for_status()
        return len(r.json()["tokens"])

    def text(n: int) -> str:
        return f"[{salt}] You are assistant {salt}. " + " ".join(WORDS[i % len(WORDS)] for i in range(n))

    n = tokens
    for _ in range(4):
        n = max(1, int(n * tokens / max(1, count(text(n)))))
    return text(n), count(text(n))


class Serve:
    """Ray Serve on this machine with the app(s) of this benchmark."""

    def __init__(self, model: str, users: int, n_ctx: int, threads: int) -> None:
        import ray
        from ray import serve

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
        self.port = 18000 + os.getpid() % 1000
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.args = {"model": {"filename": model}, "cache_dir": tempfile.mkdtemp(prefix="bench-vol-"),
                     "accelerator": "auto", "engine": {"n_parallel": users, "n_ctx_per_slot": n_ctx,
                                                       "n_threads": threads, "prefill_chunk": 256}}

    def deploy(self, name: str, replicas: int) -> str:
        from ray import serve

        from serve_app import builder

        plain = builder.llama_model_options

        def options(args: Any, use_gpu: bool) -> dict[str, Any]:
            # What a Serve config's ``deployments:`` entry would override: the replica count, the CPUs shared.
            opts = plain(args, use_gpu)
            if replicas == 1:
                return opts
            return {**opts, "num_replicas": replicas,
                    "ray_actor_options": {**opts["ray_actor_options"], "num_cpus": 1 / replicas}}

        builder.llama_model_options = options
        # The replicas share the cores: as many llama.cpp threads in all as with one replica.
        engine = {**self.args["engine"], "n_threads": max(1, self.args["engine"]["n_threads"] // replicas)}
        try:
            serve.run(builder.build_app({**self.args, "engine": engine}), name=name, route_prefix=f"/{name}")
        finally:
            builder.llama_model_options = plain
        base = f"http://127.0.0.1:{self.port}/{name}"
        ok = 0
        while ok < 10 * replicas:  # /ready reaches a random replica: many 200s in a row mean all have loaded
            ok = ok + 1 if httpx.get(f"{base}/ready", timeout=30).status_code == 200 else 0
            time.sleep(0.05 if ok else 0.3)
        return base

    def delete(self, name: str) -> None:
        from ray import serve

        serve.delete(name)

    def close(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def start_llama_server(binary: str, model: str, users: int, n_ctx: int,
                       threads: int) -> tuple[subprocess.Popen, str, str]:
    port = 19000 + os.getpid() % 1000
    cmd = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-np", str(users),
           "-c", str(users * n_ctx), "-t", str(threads), "--jinja", "--cache-prompt"]
    log = os.path.join(tempfile.mkdtemp(prefix="bench-llama-server-"), "log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return proc, base, log
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode}: {' '.join(cmd)}")
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("llama-server did not become healthy in 300 s")


def targets(res: dict[str, Any]) -> dict[str, Any]:
    cache, nocache = res["cache"], res["nocache"]
    out: dict[str, Any] = {}

    def check(name: str, value: float | None, what: str) -> None:
        met = value is not None and value >= TARGETS[name]
        out[name] = {"target": f">= {TARGETS[name]}", "value": None if value is None else round(value, 3),
                     "met": met, "what": what}

    check("warm_ttft_speedup", cache["probe"]["speedup"],
          "TTFT alone on an idle server: a new system prompt / the same system prompt with another user message")
    check("cached_vs_previous_turn", cache["cached_vs_previous_turn"]["min"],
          "min over later turns of cached_tokens / (previous turn's prompt + answer)")
    check("throughput_vs_nocache", cache["completion_tokens_per_s"] / max(1e-9, nocache["completion_tokens_per_s"]),
          "completion tokens/s over the workload, cache on / cache_prompt false")
    if "cache_2_replicas" in res:
        check("two_replica_hit_rate_vs_one", res["cache_2_replicas"]["hit_rate"] / max(1e-9, cache["hit_rate"]),
              "hit rate (cached / prompt tokens) with 2 replicas / with 1")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a GGUF file; default: the 150M bench model with a 32k vocabulary")
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=1500)
    ap.add_argument("--answer-tokens", type=int, default=64)
    ap.add_argument("--n-ctx-per-slot", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--replicas", type=int, choices=(1, 2), default=1)
    ap.add_argument("--llama-server", help="path of a llama-server binary to run the same workload against")
    ap.add_argument("--out", help="also write the JSON here (Ray may print to stdout while it shuts down)")
    a = ap.parse_args(argv)
    model = a.model or write_gguf(Path(tempfile.mkdtemp(prefix="bench-model-")) / "bench-32k.gguf", BENCH_SPEC_32K)

    srv = Serve(model, a.users, a.n_ctx_per_slot, a.threads)
    res: dict[str, Any] = {}
    setup: dict[str, Any] = {"model": os.path.basename(model), "users": a.users, "turns": a.turns,
                             "answer_tokens": a.answer_tokens, "threads": a.threads, "slots": a.users,
                             "n_ctx_per_slot": a.n_ctx_per_slot}
    try:
        base = srv.deploy("prefix", 1)
        run = {"users": a.users, "turns": a.turns, "answer": a.answer_tokens}
        for i, (mode, cache) in enumerate((("cache", True), ("nocache", False))):
            system, n = system_prompt(base, a.system_tokens, f"{mode}{i}")
            setup["system_prompt_tokens"] = n
            res[mode] = asyncio.run(workload(base, system, cache=cache, **run))
            res[mode]["probe"] = asyncio.run(probe(base, a.system_tokens, mode, cache))
        if a.replicas == 2:
            srv.delete("prefix")
            base2 = srv.deploy("prefix2", 2)
            system, _ = system_prompt(base2, a.system_tokens, "two")
            res["cache_2_replicas"] = asyncio.run(workload(base2, system, cache=True, **run))
            srv.delete("prefix2")
    finally:
        srv.close()
    if a.llama_server:
        proc, lbase, log = start_llama_server(a.llama_server, model, a.users, a.n_ctx_per_slot, a.threads)
        try:
            system, _ = system_prompt(lbase, a.system_tokens, "llama-server")
            res["llama_server"] = asyncio.run(workload(lbase, system, cache=True, **run))
            try:
                res["llama_server"]["probe"] = asyncio.run(probe(lbase, a.system_tokens, "llama-server", True))
            except Exception as e:
                res["llama_server"]["probe"] = {"error": f"{type(e).__name__}: {e}"}
        except Exception as e:  # the peer failing must not cost the figures above
            res["llama_server"] = {"error": f"{type(e).__name__}: {e}", "exit_code": proc.poll(),
                                   "log_tail": Path(log).read_text(errors="replace")[-1500:]}
        finally:
            proc.terminate()
            proc.wait(30)
    doc = json.dumps({"setup": setup, **res, "targets": targets(res)}, indent=1)
    if a.out:
        Path(a.out).write_text(doc + "\n")
    print(doc)


if __name__ == "__main__":
    main()
