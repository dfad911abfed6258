"""The GPU this process uses, through NVML (``nvidia-ml-py``): its name and memory.

CUDA numbers the devices it can see from ``CUDA_VISIBLE_DEVICES``; NVML numbers every device of the machine. The
first visible entry (an index or a ``GPU-``/``MIG-`` UUID) is the device llama.cpp puts the model on, so that is
the one named and measured. Nothing here raises: no driver, no library or no visible device gives None ("cpu").
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from serve_app.settings import Settings

log = logging.getLogger("serve_app.engine")

_lock = threading.Lock()
_nvml: Any = None  # the initialised pynvml module; False once it is known to be unusable here


def _lib() -> Any:
    """pynvml after ``nvmlInit`` (once per process), or None where there is no NVIDIA driver or library."""
    global _nvml
    with _lock:
        if _nvml is None:
            try:
                import pynvml

                pynvml.nvmlInit()
                _nvml = pynvml
            except Exception as e:  # ImportError, NVMLError (no driver), OSError (no libnvidia-ml)
                log.info("NVML unavailable (%s): GPU memory is not reported", type(e).__name__)
                _nvml = False
        return _nvml or None


def visible_device(cuda_visible_devices: str | None) -> int | str | None:
    """The device CUDA calls 0: an NVML index or a UUID; None when no device is visible."""
    if cuda_visible_devices is None:
        return 0
    first = cuda_visible_devices.split(",")[0].strip()
    if not first or first == "NoDevFiles":
        return None
    if first.lstrip("-").isdigit():
        return int(first) if int(first) >= 0 else None  # CUDA stops at the first invalid (negative) entry
    return first


def _handle() -> tuple[Any, Any] | None:
    nvml = _lib()
    if nvml is None:
        return None
    dev = visible_device(Settings().cuda_visible_devices)
    if dev is None:
        return None
    try:
        h = nvml.nvmlDeviceGetHandleByIndex(dev) if isinstance(dev, int) else nvml.nvmlDeviceGetHandleByUUID(dev)
    except Exception:  # NVMLError: no such device
        return None
    return nvml, h


def device_name() -> str:
    """Name of the GPU in use (for profile keys, no spaces), or 'cpu'."""
    try:
        got = _handle()
        if got is None:
            return "cpu"
        nvml, h = got
        name = nvml.nvmlDeviceGetName(h)
        name = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
        return name.strip().replace(" ", "_") or "cpu"
    except Exception:
        return "cpu"


def gpu_memory() -> dict[str, int] | None:
    """Used / free / total bytes of the GPU in use; None without one."""
    try:
        got = _handle()
        if got is None:
            return None
        nvml, h = got
        info = nvml.nvmlDeviceGetMemoryInfo(h)
        return {"used_bytes": int(info.used), "free_bytes": int(info.free), "total_bytes": int(info.total)}
    except Exception:
        return None
