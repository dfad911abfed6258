"""Cache benchmark: prints one JSON object.

* ``verify``: sha256 throughput of our verifier (``hash_file``) vs plain ``hashlib.file_digest`` on the same file
  (best of ``--repeat`` alternating runs each, so both see the same page-cache state).
* ``warm_status``: ``ModelStore.status`` / ``ensure`` latency for the cached file (median and p95 of ``--runs``).
* ``cold_pull``: ``ModelStore.ensure`` from an empty volume against the loopback fake Hub (metadata, HEAD, GET,
  streaming hash, fsync, publish), in MB/s.

Usage: ``python bench/bench_cache.py [--size-mb 1024] [--runs 50] [--repeat 2] [--dir DIR]``
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

REPO = "bench/cache-GGUF"
FILE = "bench-Q4_K_M.gguf"


def make_file(path: Path, size_mb: int) -> None:
    chunk = 8 * 1024 * 1024
    remaining = size_mb * 1024 * 1024
    with open(path, "wb") as f:
        while remaining:
            n = min(chunk, remaining)
            f.write(os.urandom(n))
            remaining -= n


def bench_verify(path: Path, repeat: int) -> dict:
    from serve_app.cache.integrity import hash_file, hashlib_baseline

    size_mb = path.stat().st_size / 1e6
    ours: list[float] = []
    base: list[float] = []
    for _ in range(repeat):
        t = time.perf_counter()
        expected = hashlib_baseline(str(path))
        base.append(time.perf_counter() - t)
        t = time.perf_counter()
        got = hash_file(str(path)).sha256
        ours.append(time.perf_counter() - t)
        assert got == expected
    ours_mbs, base_mbs = size_mb / min(ours), size_mb / min(base)
    return {"ours_mb_s": round(ours_mbs, 1), "hashlib_mb_s": round(base_mbs, 1), "ratio": round(ours_mbs / base_mbs, 3)}


def timed_ms(fn: object, runs: int) -> dict:
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    return {"median_ms": round(statistics.median(samples), 3), "p95_ms": round(samples[int(0.95 * (runs - 1))], 3)}


def bench_store(path: Path, work: Path, runs: int) -> dict:
    from serve_app.cache import ModelStore
    from serve_app.config import DownloadConfig, ModelRef
    from tests.support.fake_hub import FakeHub

    with FakeHub() as hub:
        hub.add_file(REPO, FILE, path)
        os.environ["HF_ENDPOINT"] = hub.endpoint
        store = ModelStore(str(work / "vol"), DownloadConfig(timeout_s=3600), progress="none")
        ref = ModelRef(repo_id=REPO, filename=FILE)
        t = time.perf_counter()
        cached = store.ensure(ref)
        cold_s = time.perf_counter() - t
        hub.reset_log()
        status = timed_ms(lambda: store.status(ref), runs)
        ensure = timed_ms(lambda: store.ensure(ref), runs)
        assert store.status(ref).state == "present" and not hub.requests
    return {
        "cold_pull": {"mb_s": round(cached.size / 1e6 / cold_s, 1), "seconds": round(cold_s, 2)},
        "warm_status": {**status, "runs": runs, "requests": 0},
        "warm_ensure": ensure,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed afterwards)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-cache-") as tmp:
        work = Path(tmp)
        source = work / "source.gguf"
        make_file(source, args.size_mb)
        result = {"size_mb": args.size_mb, "cpus": os.cpu_count(), "verify": bench_verify(source, args.repeat)}
        result.update(bench_store(source, work, args.runs))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
