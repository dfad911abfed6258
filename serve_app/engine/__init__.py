"""The batching engine over llama-cpp-python: the only package that imports ``llama_cpp``."""

from .aio import RequestStream, open_stream
from .core import Engine, EngineRequest, EngineStats
from .llama import LlamaModelHandle, gpu_offload_supported
from .loader import LoadReport, device_name, gpu_memory, load_engine

__all__ = [
    "Engine", "EngineRequest", "EngineStats", "LlamaModelHandle",
    "LoadReport", "RequestStream", "device_name", "gpu_memory", "gpu_offload_supported", "load_engine", "open_stream",
]
