#!/usr/bin/env python3
"""Cold-start phases of the RunPod worker (``python -m serve_app.runpod``, RunPod's own worker loop against a local
job API) for each place the model can come from:

  empty_volume   nothing cached: downloaded from a loopback Hub, verified, published on the volume
  warm_volume    already verified on the volume (manifest + stat)
  runpod_cache   in a Hugging Face cache directory (RunPod's cached models): hashed, then linked into the volume
  baked_image    in a read-only baked directory (the image's /opt/models): manifest + size check

Phases, in seconds from the worker process's start (``spawn``) unless said otherwise:
  ray_up_s        Ray has started in the worker process (its "Started a local Ray instance" line)
  cache_s         ModelCache.ensure as the replica measured it (ModelInfo.phases; a duration)
  load_s          llama.cpp model + context + engine thread (ModelInfo.phases; a duration)
  ready_s         the worker saw the model ready and started taking jobs
  first_token_s   the first streamed token of a job queued before the worker started
  ensure_direct_ms ModelStore.ensure alone, in this process, on fresh directories of the same scenario: the cache
                  check without waiting for the ModelCache replica (which cache_s includes)
Prints one JSON object. Every scenario starts a fresh worker, its own Ray instance and an empty page cache is NOT
forced (the model file stays in the OS page cache between scenarios, as on a warm host).

    python bench/bench_coldstart_paths.py [--model x.gguf] [--repeats 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serve_app.cache.store import ModelStore  # noqa: E402
from serve_app.config import ModelRef  # noqa: E402
from tests.support.fake_hub import FakeHub  # noqa: E402
from tests.support.fake_runpod import FakeRunPod  # noqa: E402
from tests.support.gguf_factory import BENCH_SPEC, write_gguf  # noqa: E402
from tests.support.procs import stop_process_group  # noqa: E402

HUB_REPO = "bench/coldstart-GGUF"
SCENARIOS = ("empty_volume", "warm_volume", "runpod_cache", "baked_image")
RAY_UP = "Started a local Ray instance"
READY = re.compile(r"model \S+ ready \(\S+ slots\)")  # the bootstrap's line once it takes jobs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare(scenario: str, work: Path, hub: FakeHub, ref: ModelRef) -> dict[str, str]:
    """The scenario's directories; returns the environment that points the worker at them."""
    volume = work / "volume"
    env = {"GGUF_SERVE_BAKED_DIR": "", "GGUF_SERVE_HF_CACHE_DIRS": ""}
    if scenario == "warm_volume":
        ModelStore(str(volume), baked_dir="", hf_cache_dirs=[], progress="none").ensure(ref)
    elif scenario == "runpod_cache":
        from huggingface_hub import hf_hub_download

        hf = work / "huggingface-cache" / "hub"
        hf_hub_download(HUB_REPO, ref.filename, cache_dir=str(hf), endpoint=hub.endpoint, token=False)
        env["GGUF_SERVE_HF_CACHE_DIRS"] = str(hf)
    elif scenario == "baked_image":
        baked = work / "opt-models"
        ModelStore(str(baked), baked_dir="", hf_cache_dirs=[], progress="none").ensure(ref)
        subprocess.run(["chmod", "-R", "a-w", str(baked)], check=True)
        env["GGUF_SERVE_BAKED_DIR"] = str(baked)
    env["_VOLUME"] = str(volume)
    return env


def write_config(work: Path, volume: str, port: int, ref: ModelRef) -> Path:
    config = work / "serve_config.yaml"
    config.write_text(yaml.safe_dump({
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "llm", "route_prefix": "/", "import_path": "serve_app.builder:build_app",
            "args": {"model": ref.model_dump(), "cache_dir": volume, "accelerator": "auto",
                     "engine": {"n_parallel": 4, "n_ctx_per_slot": 1024}},
        }],
    }))
    return config


def ensure_direct(scenario: str, hub: FakeHub, ref: ModelRef) -> float:
    work = Path(tempfile.mkdtemp(prefix=f"cold-direct-{scenario}-"))
    try:
        env = prepare(scenario, work, hub, ref)
        hf = [env["GGUF_SERVE_HF_CACHE_DIRS"]] if env["GGUF_SERVE_HF_CACHE_DIRS"] else []
        store = ModelStore(env["_VOLUME"], baked_dir=env["GGUF_SERVE_BAKED_DIR"], hf_cache_dirs=hf, progress="none")
        t0 = time.perf_counter()
        store.ensure(ref)
        return time.perf_counter() - t0
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(work)], check=False)
        shutil.rmtree(work, ignore_errors=True)


def run_worker(scenario: str, hub: FakeHub, ref: ModelRef) -> dict[str, Any]:
    import httpx

    work = Path(tempfile.mkdtemp(prefix=f"cold-{scenario}-"))
    try:
        env_dirs = prepare(scenario, work, hub, ref)
        port = free_port()
        config = write_config(work, env_dirs.pop("_VOLUME"), port, ref)
        with FakeRunPod() as fake:
            job = fake.add_job({"openai_route": "/v1/completions", "openai_input": {
                "prompt": "the quick brown", "max_tokens": 4, "stream": True}})
            env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNPOD_", "RAY_", "GGUF_SERVE_"))}
            env.update(**fake.env(), **env_dirs, HF_ENDPOINT=hub.endpoint, RAY_ADDRESS="local", PYTHONUNBUFFERED="1",
                       GGUF_SERVE_CONFIG=str(config), RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))
            log_path = work / "worker.log"
            with log_path.open("wb") as log:
                t0 = time.perf_counter()
                proc = subprocess.Popen([sys.executable, "-m", "serve_app.runpod"], cwd=REPO, env=env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            try:
                marks = watch(proc, log_path, fake, job, t0)
                phases = httpx.get(f"http://127.0.0.1:{port}/stats", timeout=30).json()["phases"]
            finally:
                stop_process_group(proc)
        return {"ray_up_s": marks["ray_up_s"], "cache_s": round(phases["cache_s"], 3),
                "load_s": round(phases["load_s"], 3), "ready_s": marks["ready_s"],
                "first_token_s": marks["first_token_s"], "ensure_direct_ms": 1000 * ensure_direct(scenario, hub, ref)}
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(work)], check=False)
        shutil.rmtree(work, ignore_errors=True)


def watch(proc: subprocess.Popen[bytes], log_path: Path, fake: FakeRunPod, job: str, t0: float) -> dict[str, float]:
    """Poll the worker's log and the job API; the time of each mark, from the spawn."""
    marks: dict[str, float] = {}
    deadline = time.monotonic() + 300
    while "first_token_s" not in marks:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker failed (rc={proc.returncode}):\n{log_path.read_text(errors='replace')[-3000:]}")
        now = round(time.perf_counter() - t0, 3)
        text = log_path.read_text(errors="replace")
        if "ray_up_s" not in marks and RAY_UP in text:
            marks["ray_up_s"] = now
        if "ready_s" not in marks and READY.search(text):
            marks["ready_s"] = now
        if any(isinstance(o, str) and '"text"' in o for o in fake.stream_outputs(job)):
            marks["first_token_s"] = now
        time.sleep(0.01)
    return marks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a GGUF file (default: the 150M bench model, written to a temp dir)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--layers", type=int, default=BENCH_SPEC.n_layer,
                    help="layers of the generated bench model (12: 253 MB; 48: ~1 GB)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    a = ap.parse_args()
    spec = dataclasses.replace(BENCH_SPEC, n_layer=a.layers)
    path = a.model or write_gguf(Path(tempfile.mkdtemp(prefix="bench-")) / f"bench-{a.layers}l-F16.gguf", spec)
    ref = ModelRef(repo_id=HUB_REPO, filename=os.path.basename(path))
    out: dict[str, Any] = {"model": os.path.basename(path), "size_mb": round(os.path.getsize(path) / 2**20, 1),
                           "repeats": a.repeats, "scenarios": {}}
    with FakeHub() as hub:
        hub.add_file(HUB_REPO, ref.filename, path)
        os.environ["HF_ENDPOINT"] = hub.endpoint  # this process's own pulls (the volumes the scenarios start from)
        for scenario in a.scenarios.split(","):
            runs = [run_worker(scenario, hub, ref) for _ in range(a.repeats)]
            out["scenarios"][scenario] = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
