"""Memory planning: the rungs of the memory ladder, what a rung costs, what the machine has free, and the profile
that remembers which rung worked.

No llama.cpp here: the numbers come from the model's header fields, ``/proc/meminfo``, the cgroup (v2) the process
runs in, and NVML (``device.py``), so all of it is unit-tested without a model.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from serve_app.config import EngineConfig
from serve_app.errors import OutOfMemoryError

log = logging.getLogger("serve_app.engine")

GGML_TYPES = {"f16": 1, "q4_0": 2, "q8_0": 8}
_KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
CGROUP_DIR = "/sys/fs/cgroup"
MORE_MEMORY = 1.25  # a remembered downgrade is retried from the top once this much more memory is available


@dataclass(frozen=True)
class ContextPlan:
    """One rung of the memory ladder: what we ask llama.cpp for."""

    n_parallel: int
    n_ctx_per_slot: int
    n_batch: int
    n_ubatch: int
    kv_type: str
    n_gpu_layers: int
    flash_attn: str
    kv_unified: bool = False  # last, with a default: profiles written before it existed still load
    swa_full: bool = False  # likewise

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> ContextPlan:
        return cls(cfg.n_parallel, cfg.n_ctx_per_slot, cfg.n_batch, min(cfg.n_ubatch, cfg.n_batch), cfg.kv_type,
                   cfg.n_gpu_layers, cfg.flash_attn, cfg.kv_unified, cfg.swa_full)

    def describe(self) -> dict[str, Any]:
        return dict(self.__dict__)


def memory_ladder(first: ContextPlan, n_layers: int, on_gpu: bool) -> list[ContextPlan]:
    """Successively cheaper plans, each building on the previous one.

    Order: fewer slots, smaller n_batch, smaller context per slot, quantised KV, fewer GPU layers. Each step
    roughly halves one consumer, so the ladder is short even from absurd settings.
    """
    plans = [first]
    p = first
    while p.n_parallel > 1:
        p = replace(p, n_parallel=max(1, p.n_parallel // 2))
        plans.append(p)
    while p.n_batch > 64:
        nb = max(64, p.n_batch // 2)
        p = replace(p, n_batch=nb, n_ubatch=min(p.n_ubatch, nb))
        plans.append(p)
    while p.n_ctx_per_slot > 256:
        p = replace(p, n_ctx_per_slot=max(256, p.n_ctx_per_slot // 2))
        plans.append(p)
    for kv in ("q8_0", "q4_0"):
        if GGML_TYPES[kv] != GGML_TYPES[p.kv_type] and (p.kv_type, kv) != ("q4_0", "q8_0"):
            p = replace(p, kv_type=kv, flash_attn="on" if on_gpu else p.flash_attn)
            plans.append(p)
    if on_gpu:
        layers = n_layers if p.n_gpu_layers < 0 else p.n_gpu_layers
        while layers > 0:
            layers //= 2
            p = replace(p, n_gpu_layers=layers)
            plans.append(p)
    return plans


class ModelShape(Protocol):
    n_layer: int
    n_head: int
    n_head_kv: int
    n_embd: int
    n_vocab: int


def context_bytes(model: ModelShape, plan: ContextPlan) -> int:
    """Estimated host/device bytes for a context: the KV cache plus logits and a compute-buffer allowance."""
    kv_dim = model.n_head_kv * (model.n_embd // model.n_head)
    cells = plan.n_parallel * plan.n_ctx_per_slot
    kv = model.n_layer * 2 * kv_dim * cells * _KV_BYTES[plan.kv_type]
    logits = plan.n_batch * model.n_vocab * 4
    compute = plan.n_ubatch * (model.n_embd * 16 + model.n_vocab) * 4
    return int(kv + logits + compute)


def preflight(model: ModelShape, plan: ContextPlan, budget: int | None) -> None:
    """Refuse a plan that cannot fit before llama.cpp tries: on a CPU an oversized KV is not an error but an
    OOM kill of the whole replica (the kernel's, not llama.cpp's)."""
    if budget is None:
        return
    need = context_bytes(model, plan)
    if need > budget:
        raise OutOfMemoryError(f"context needs ~{need / 2**20:.0f} MiB but {budget / 2**20:.0f} MiB is available")


# ---- free memory ---------------------------------------------------------------------------------------------


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) and garbage both mean: no figure


def cgroup_free_bytes(cgroup_dir: str | os.PathLike[str] = CGROUP_DIR) -> int | None:
    """Room left under a cgroup v2 memory limit (``memory.max`` - ``memory.current``); None without a limit.

    The kernel OOM-kills a container at its cgroup limit however much ``MemAvailable`` the host reports."""
    root = Path(cgroup_dir)
    limit = _read_int(root / "memory.max")
    if limit is None:
        return None
    return max(0, limit - (_read_int(root / "memory.current") or 0))


def host_free_bytes(meminfo: str | os.PathLike[str] = "/proc/meminfo",
                    cgroup_dir: str | os.PathLike[str] = CGROUP_DIR) -> int | None:
    """Memory this process can still use on the host: ``MemAvailable``, capped by its cgroup's limit."""
    avail: int | None = None
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        avail = None
    room = cgroup_free_bytes(cgroup_dir)
    figures = [x for x in (avail, room) if x is not None]
    return min(figures) if figures else None


def memory_budget(cfg: EngineConfig, free: int | None) -> int | None:
    """What one context may use: the configured cap, and 90% of what is free (the estimate is not exact and
    other processes allocate too)."""
    budget = cfg.memory_budget_mb * 2**20 if cfg.memory_budget_mb else None
    if free is not None:
        budget = min(budget or free, int(free * 0.9))
    return budget


# ---- remembered rungs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """What a remembered rung was measured on: when any of it changes, the rung is stale."""

    device: str  # GPU name, or "cpu"
    total_bytes: int | None  # total memory of that device
    budget_bytes: int | None  # the memory budget the rung had to fit in
    model_key: str  # the model file (see ``model_key``)


def model_key(path: str) -> str:
    """Identifies a model file cheaply: its size and a hash of its first and last 64 KiB (the GGUF header and the
    tail of the tensor data), so a different file under the same name is noticed without hashing gigabytes."""
    import hashlib

    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        h.update(f.read(1 << 16))
        if size > 1 << 16:
            f.seek(max(1 << 16, size - (1 << 16)))
            h.update(f.read(1 << 16))
    return f"{size}-{h.hexdigest()[:16]}"


def read_profile(path: str | None, requested: ContextPlan, now: Measured) -> ContextPlan | None:
    """The rung remembered for these settings, unless it was measured on other hardware, another model file, or
    with clearly less memory than there is now: then start again from the requested plan."""
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if ContextPlan(**data["requested"]) != requested:
            return None  # the config changed since: start from the new request
        then = Measured(**data["measured"])
        plan = ContextPlan(**data["plan"])
    except (OSError, ValueError, TypeError, KeyError):
        log.warning("ignoring unreadable or outdated engine profile %s", os.path.basename(path))
        return None
    if (then.device, then.total_bytes, then.model_key) != (now.device, now.total_bytes, now.model_key):
        log.info("engine profile was measured on %s / %s; retrying the requested plan", then.device, then.model_key)
        return None
    if then.budget_bytes is not None and (now.budget_bytes is None or now.budget_bytes > then.budget_bytes * MORE_MEMORY):
        log.info("more memory is available than when the engine profile was measured; retrying the requested plan")
        return None
    return plan


def write_profile(path: str | None, requested: ContextPlan, plan: ContextPlan, measured: Measured) -> None:
    if not path:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # A unique name: workers in other containers on the same volume can have the same pid.
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        body = {"requested": requested.describe(), "plan": plan.describe(), "measured": asdict(measured),
                "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(body, f, indent=2)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        log.warning("could not write engine profile %s: %s", os.path.basename(path), e)
