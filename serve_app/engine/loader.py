"""Create an engine for a GGUF file, walking down the memory ladder when llama.cpp cannot allocate.

The rung that worked is remembered in a small JSON profile (on the model volume, keyed by file and device) so the
next start of the same model on the same kind of GPU begins there instead of failing its way down again.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass, field, replace
from typing import Any

from serve_app.config import EngineConfig
from serve_app.errors import ModelLoadError, OutOfMemoryError

from .core import Engine
from .llama import (
    ContextPlan,
    LlamaContextHandle,
    LlamaModelHandle,
    context_bytes,
    gpu_offload_supported,
    memory_ladder,
)

log = logging.getLogger("serve_app.engine")


@dataclass
class LoadReport:
    plan: dict[str, Any]
    on_gpu: bool
    tried: list[dict[str, Any]] = field(default_factory=list)
    load_s: float = 0.0
    from_profile: bool = False
    n_ctx_seq: int = 0
    n_slots: int = 0


def device_name() -> str:
    """Name of the first GPU (for profile keys), or 'cpu'."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip().splitlines()
        return out[0].strip().replace(" ", "_") if out else "cpu"
    except (OSError, subprocess.SubprocessError):
        return "cpu"


def gpu_memory() -> dict[str, int] | None:
    """Used / total bytes of GPU 0 (seed: GPU memory monitoring); None without an NVIDIA GPU."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip().splitlines()
        used, total = (int(x) for x in out[0].split(","))
        return {"used_bytes": used * 2**20, "total_bytes": total * 2**20}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _header(path: str) -> tuple[int, int]:
    """(layers, training context) from the GGUF without loading weights."""
    try:
        m = LlamaModelHandle(path, 0, False, vocab_only=True)
    except ModelLoadError:
        return 0, 0
    out = (m.n_layer, m.n_ctx_train)
    m.close()
    return out


def count_layers(path: str) -> int:
    return _header(path)[0]


def read_ctx_train(path: str) -> int:
    return _header(path)[1]


def available_bytes(on_gpu: bool) -> int | None:
    """Free memory where the context will live: GPU 0 when offloading, else the host's MemAvailable."""
    if on_gpu:
        mem = gpu_memory()
        return None if mem is None else mem["total_bytes"] - mem["used_bytes"]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def preflight(model: LlamaModelHandle, plan: ContextPlan, budget: int | None) -> None:
    """Refuse a plan that cannot fit before llama.cpp tries: on a CPU an oversized KV is not an error but an
    OOM kill of the whole replica (measured here)."""
    if budget is None:
        return
    need = context_bytes(model, plan)
    if need > budget:
        raise OutOfMemoryError(f"context needs ~{need / 2**20:.0f} MiB but {budget / 2**20:.0f} MiB is available")


def _read_profile(path: str | None, requested: ContextPlan) -> ContextPlan | None:
    """The rung remembered for this file and device, if it was found for the same requested settings."""
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if ContextPlan(**data["requested"]) != requested:
            return None  # the config changed since: start from the new request
        return ContextPlan(**data["plan"])
    except (OSError, ValueError, TypeError, KeyError):
        log.warning("ignoring unreadable engine profile %s", path)
        return None


def _write_profile(path: str | None, requested: ContextPlan, plan: ContextPlan) -> None:
    if not path:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"requested": requested.describe(), "plan": plan.describe(), "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                      f, indent=2)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not write engine profile %s: %s", path, e)


def load_engine(path: str, cfg: EngineConfig, *, want_gpu: bool, profile_path: str | None = None) -> tuple[
        Engine, LlamaModelHandle, LoadReport]:
    """Load ``path`` and start an engine; raises ModelLoadError (bad file) or OutOfMemoryError (ladder exhausted)."""
    t0 = time.perf_counter()
    on_gpu = want_gpu and gpu_offload_supported()
    first = ContextPlan.from_config(cfg)
    if not on_gpu:
        first = ContextPlan(**{**first.describe(), "n_gpu_layers": 0})
    n_ctx_train = read_ctx_train(path)
    if n_ctx_train and first.n_ctx_per_slot > n_ctx_train:
        log.warning("n_ctx_per_slot %d is above the model's training context %d; using %d", first.n_ctx_per_slot,
                    n_ctx_train, n_ctx_train)
        first = replace(first, n_ctx_per_slot=n_ctx_train)
    remembered = _read_profile(profile_path, first)
    start = remembered or first
    extra_bufts = cfg.use_extra_bufts if cfg.use_extra_bufts is not None else on_gpu
    threads = cfg.n_threads or os.cpu_count() or 1
    report = LoadReport(plan=start.describe(), on_gpu=on_gpu, from_profile=remembered is not None)

    model: LlamaModelHandle | None = None
    last_err: Exception | None = None
    failed_layers: set[int] = set()
    plans = memory_ladder(start, n_layers=count_layers(path) if on_gpu else 0, on_gpu=on_gpu)
    for plan in plans:
        if plan.n_gpu_layers in failed_layers:
            continue
        try:
            if model is None or model.n_gpu_layers != plan.n_gpu_layers:
                if model is not None:
                    model.close()
                    model = None
                    gc.collect()
                model = LlamaModelHandle(path, plan.n_gpu_layers, extra_bufts)
            free = available_bytes(on_gpu)
            budget = cfg.memory_budget_mb * 2**20 if cfg.memory_budget_mb else None
            if free is not None:
                # Leave headroom for the runtime: the estimate is not exact and other processes allocate too.
                budget = min(budget or free, int(free * 0.9))
            preflight(model, plan, budget)
            ctx = LlamaContextHandle(model, plan, threads)
        except (ModelLoadError, OutOfMemoryError) as e:
            report.tried.append({"plan": plan.describe(), "error": e.message})
            last_err = e
            gc.collect()
            if not isinstance(e, OutOfMemoryError):
                if plan.n_gpu_layers == 0:
                    break  # nothing cheaper to try: the file itself does not load
                failed_layers.add(plan.n_gpu_layers)
            continue
        if plan != first or remembered is not None:
            _write_profile(profile_path, first, plan)
        if report.tried:
            log.warning("loaded after %d failed attempts with %s", len(report.tried), plan.describe())
        engine = Engine(model, ctx, prefill_chunk=cfg.prefill_chunk, max_queue=cfg.max_queue)
        report.plan = plan.describe()
        report.load_s = time.perf_counter() - t0
        report.n_ctx_seq = ctx.n_ctx_seq
        report.n_slots = ctx.n_seq_max
        return engine, model, report
    if model is not None:
        model.close()
    if isinstance(last_err, OutOfMemoryError):
        raise OutOfMemoryError(f"no memory plan fits after {len(report.tried)} attempts: {last_err.message}")
    raise last_err or ModelLoadError("model could not be loaded")

