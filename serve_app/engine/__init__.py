"""The batching engine over llama-cpp-python: the only package that imports ``llama_cpp``.

Names are resolved on first use, and ``llama_cpp`` itself is imported only when a model or an engine is created,
so importing this package (for its types) stays cheap for processes that never run a model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .aio import RequestStream, open_stream
    from .device import device_name, gpu_memory
    from .generation import EngineRequest
    from .grammar import GrammarSampler, compile_grammar
    from .llama import LlamaModelHandle
    from .loader import LoadReport, load_engine
    from .scheduler import Engine
    from .stats import EngineStats

_EXPORTS = {
    "RequestStream": "aio", "open_stream": "aio",
    "device_name": "device", "gpu_memory": "device",
    "EngineRequest": "generation",
    "GrammarSampler": "grammar", "compile_grammar": "grammar",
    "LlamaModelHandle": "llama",
    "LoadReport": "loader", "load_engine": "loader",
    "Engine": "scheduler", "EngineStats": "stats",
}

__all__ = [
    "Engine", "EngineRequest", "EngineStats", "GrammarSampler", "LlamaModelHandle", "LoadReport", "RequestStream", "compile_grammar",
    "device_name", "gpu_memory", "load_engine", "open_stream",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
