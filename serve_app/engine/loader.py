"""Create an engine for a GGUF file, walking down the memory ladder (``plan.py``) when a rung does not fit.

The rung that worked is remembered in a small JSON profile (on the model volume) together with what it was measured
on, so the next start of the same model on the same hardware begins there instead of failing its way down again.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

from serve_app.config import EngineConfig
from serve_app.errors import ModelLoadError, OutOfMemoryError

from .device import device_name, gpu_memory
from .llama import LlamaContextHandle, LlamaModelHandle, gpu_offload_supported
from .plan import (
    ContextPlan,
    Measured,
    host_free_bytes,
    memory_budget,
    memory_ladder,
    model_key,
    preflight,
    read_profile,
    write_profile,
)
from .scheduler import Engine

log = logging.getLogger("serve_app.engine")


@dataclass
class LoadReport:
    plan: dict[str, Any]
    on_gpu: bool
    tried: list[dict[str, Any]] = field(default_factory=list)
    load_s: float = 0.0
    from_profile: bool = False


def _header(path: str) -> tuple[int, int]:
    """(layers, training context) from the GGUF without loading weights."""
    try:
        m = LlamaModelHandle(path, 0, False, vocab_only=True)
    except ModelLoadError:
        return 0, 0
    out = (m.n_layer, m.n_ctx_train)
    m.close()
    return out


def available_bytes(on_gpu: bool) -> int | None:
    """Free memory where the context will live: the GPU in use when offloading, else the host (cgroup-aware)."""
    if on_gpu:
        mem = gpu_memory()
        return None if mem is None else mem["free_bytes"]
    return host_free_bytes()


def _requested_plan(path: str, cfg: EngineConfig, on_gpu: bool) -> tuple[ContextPlan, int]:
    """The configured plan, fitted to this host and model; and the model's layer count."""
    first = ContextPlan.from_config(cfg)
    if not on_gpu:
        first = replace(first, n_gpu_layers=0)
    n_layers, n_ctx_train = _header(path)
    if n_ctx_train and first.n_ctx_per_slot > n_ctx_train:
        log.warning("n_ctx_per_slot %d is above the model's training context %d; using %d", first.n_ctx_per_slot,
                    n_ctx_train, n_ctx_train)
        first = replace(first, n_ctx_per_slot=n_ctx_train)
    return first, n_layers


def _measured(path: str, cfg: EngineConfig, on_gpu: bool) -> Measured:
    mem = gpu_memory() if on_gpu else None
    return Measured(device=device_name() if on_gpu else "cpu", total_bytes=mem["total_bytes"] if mem else None,
                    budget_bytes=memory_budget(cfg, available_bytes(on_gpu)), model_key=model_key(path))


class _Ladder:
    """Walks the rungs, reloading the weights only when a rung changes the number of GPU layers."""

    def __init__(self, path: str, cfg: EngineConfig, on_gpu: bool, report: LoadReport) -> None:
        self.path, self.cfg, self.on_gpu, self.report = path, cfg, on_gpu, report
        self.extra_bufts = cfg.use_extra_bufts if cfg.use_extra_bufts is not None else on_gpu
        self.threads = cfg.n_threads or os.cpu_count() or 1
        self.model: LlamaModelHandle | None = None
        self.last_err: ModelLoadError | None = None

    def climb(self, plans: list[ContextPlan]) -> tuple[ContextPlan, LlamaContextHandle] | None:
        failed_layers: set[int] = set()
        for plan in plans:
            if plan.n_gpu_layers in failed_layers:
                continue
            try:
                return plan, self._try(plan)
            except ModelLoadError as e:  # OutOfMemoryError included
                self.report.tried.append({"plan": plan.describe(), "error": e.message})
                self.last_err = e
                gc.collect()
                if not isinstance(e, OutOfMemoryError):
                    if plan.n_gpu_layers == 0:
                        break  # nothing cheaper to try: the file itself does not load
                    failed_layers.add(plan.n_gpu_layers)
        if self.model is not None:
            self.model.close()
        return None

    def _try(self, plan: ContextPlan) -> LlamaContextHandle:
        if self.model is None or self.model.n_gpu_layers != plan.n_gpu_layers:
            if self.model is not None:
                self.model.close()
                self.model = None
                gc.collect()
            self.model = LlamaModelHandle(self.path, plan.n_gpu_layers, self.extra_bufts)
        preflight(self.model, plan, memory_budget(self.cfg, available_bytes(self.on_gpu)))
        return LlamaContextHandle(self.model, plan, self.threads)


def load_engine(path: str, cfg: EngineConfig, *, want_gpu: bool, profile_path: str | None = None) -> tuple[
        Engine, LlamaModelHandle, LoadReport]:
    """Load ``path`` and start an engine; raises ModelLoadError (bad file) or OutOfMemoryError (ladder exhausted)."""
    t0 = time.perf_counter()
    on_gpu = want_gpu and gpu_offload_supported()
    first, n_layers = _requested_plan(path, cfg, on_gpu)
    measured = _measured(path, cfg, on_gpu) if profile_path else None
    remembered = read_profile(profile_path, first, measured) if measured else None
    start = remembered or first
    report = LoadReport(plan=start.describe(), on_gpu=on_gpu, from_profile=remembered is not None)
    ladder = _Ladder(path, cfg, on_gpu, report)
    got = ladder.climb(memory_ladder(start, n_layers=n_layers if on_gpu else 0, on_gpu=on_gpu))
    if got is None:
        err = ladder.last_err
        if isinstance(err, OutOfMemoryError):
            raise OutOfMemoryError(f"no memory plan fits after {len(report.tried)} attempts: {err.message}")
        raise err or ModelLoadError("model could not be loaded")
    plan, ctx = got
    assert ladder.model is not None
    if measured and (plan != first or remembered is not None):
        write_profile(profile_path, first, plan, measured)
    if report.tried:
        log.warning("loaded after %d failed attempts with %s", len(report.tried), plan.describe())
    engine = Engine(ladder.model, ctx, prefill_chunk=cfg.prefill_chunk, max_queued_requests=cfg.max_queued_requests,
                    cache_ram_mib=cfg.cache_ram_mib)
    report.plan = plan.describe()
    report.load_s = time.perf_counter() - t0
    return engine, ladder.model, report
