"""Application arguments: the ``args:`` block of ``serve_config.yaml``, validated strictly.

Frozen pydantic models that reject unknown keys, so a typo in a config fails at deploy time with a readable
message instead of being silently ignored. Field names under ``model``, ``cache_dir`` and ``accelerator`` are a
public contract.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(_Strict):
    """Which GGUF to serve: a Hub repo + file (or quant pattern), or a local path."""

    repo_id: str | None = Field(
        default=None, description="Hub repo id, e.g. 'bartowski/Llama-3.2-1B-Instruct-GGUF'. None for a local path."
    )
    filename: str = Field(
        description="File in the repo, a glob such as '*Q4_K_M.gguf', the first part of a split GGUF, "
        "or an absolute local path when repo_id is None."
    )
    revision: str = Field(default="main", description="Branch, tag or commit; resolved to a commit and recorded.")

    @field_validator("filename")
    @classmethod
    def _filename_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("filename must not be empty")
        return v

    @property
    def is_local(self) -> bool:
        return self.repo_id is None


class DownloadConfig(_Strict):
    """How hard ModelCache tries when the network fails."""

    max_attempts: int = Field(default=3, ge=1, le=20, description="Attempts per file, corruption retries included.")
    backoff_base_s: float = Field(default=1.0, ge=0, description="First backoff; doubles each attempt.")
    backoff_max_s: float = Field(default=30.0, ge=0, description="Cap on one backoff sleep.")
    timeout_s: float = Field(default=300.0, gt=0, description="Overall deadline for obtaining one file.")
    read_timeout_s: float = Field(default=30.0, gt=0, description="Socket read timeout for metadata and body.")
    lock_timeout_s: float = Field(
        default=3600.0, gt=0, description="How long a replica waits for another one downloading the same file."
    )


KVType = Literal["f16", "q8_0", "q4_0"]


class EngineConfig(_Strict):
    """llama.cpp context and scheduling parameters."""

    n_parallel: int = Field(default=8, ge=1, le=256, description="Slots: sequences decoded together (n_seq_max).")
    n_ctx_per_slot: int = Field(
        default=4096, ge=64, description="Context per slot; the total KV is n_parallel * n_ctx_per_slot."
    )
    n_batch: int = Field(default=512, ge=16, description="Max tokens per llama_decode call.")
    n_ubatch: int = Field(default=512, ge=16, description="Physical micro-batch.")
    prefill_chunk: int = Field(
        default=128, ge=16, description="Max prompt tokens prefilled per step, so running streams stay smooth."
    )
    n_gpu_layers: int = Field(default=-1, description="-1 = all layers on the GPU when there is one.")
    flash_attn: Literal["auto", "on", "off"] = "auto"
    kv_type: KVType = Field(default="f16", description="KV cache type: f16, or quantised q8_0 / q4_0.")
    kv_unified: bool = Field(
        default=False,
        description="One KV pool shared by all slots (llama-server --kv-unified): one request may use up to "
                    "n_parallel * n_ctx_per_slot tokens. When many long requests fill it, the newest one is paused "
                    "and resumed once another finishes. Off: each slot owns n_ctx_per_slot cells, which measured 3x "
                    "faster per decode step at long contexts.",
    )
    n_threads: int | None = Field(default=None, ge=1, description="CPU threads; default: all cores.")
    max_queued_requests: int = Field(
        default=256, ge=0, validation_alias=AliasChoices("max_queued_requests", "max_queue"),
        description="Waiting requests beyond the slots; more gets 429 with Retry-After. 'max_queue' is the "
                    "deprecated name of this field and still loads.",
    )
    use_extra_bufts: bool | None = Field(
        default=None,
        description="llama.cpp extra buffer types (CPU repacking). None = off on CPU (AMX crash, llama.cpp#20824).",
    )
    memory_budget_mb: int | None = Field(
        default=None, ge=1,
        description="Cap on the context's memory (KV + buffers). Default: what the device has free. On a CPU "
        "llama.cpp does not fail an oversized context, the kernel kills the process, so we check first.",
    )
    max_tokens_default: int = Field(default=512, ge=1, description="max_tokens when a request gives none.")

    @model_validator(mode="before")
    @classmethod
    def _deprecated_names(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_queue" in data:
            warnings.warn("engine.max_queue is deprecated; use engine.max_queued_requests", DeprecationWarning,
                          stacklevel=2)
        return data

    @property
    def max_queue(self) -> int:
        """Deprecated name of ``max_queued_requests``, for code written against it."""
        return self.max_queued_requests


class BatchingConfig(_Strict):
    """Ray Serve ``@serve.batch`` admission in front of the engine (see README). Changeable live."""

    max_batch_size: int = Field(default=16, ge=1, description="Most requests admitted in one command.")
    batch_wait_timeout_s: float = Field(
        default=0.0, ge=0,
        description="Window to collect arrivals so their prompts prefill together. 0 skips the @serve.batch hop: "
        "the engine already admits everything that arrived during a step, and the hop costs time to first token.",
    )


class ServerConfig(_Strict):
    served_model_name: str | None = Field(default=None, description="Model id in the API; default: the file stem.")
    api_keys: list[str] = Field(
        default_factory=list, description="Bearer keys; empty = open. Also read from GGUF_SERVE_API_KEYS."
    )
    chat_template: str | None = Field(default=None, description="Jinja chat template overriding the GGUF's.")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    reasoning_format: Literal["none", "deepseek", "auto"] = Field(
        default="auto", description="How a thinking model's <think>...</think> is returned, unless a request says: "
        "none: left in the content; deepseek/auto: split into reasoning_content.")
    low_latency: bool = Field(
        default=True,
        description="Ingress -> LlamaModel calls over Ray Serve's direct gRPC channel, and user code on the "
                    "replicas' main event loop (saves ~5 ms of time to first token; see README).",
    )


class AppArgs(_Strict):
    """The ``args`` of the ``llm`` application."""

    model: ModelRef
    cache_dir: str = Field(default="./models", description="The model volume (RunPod: /runpod-volume/models).")
    accelerator: Literal["auto", "gpu", "cpu"] = Field(
        default="auto", description="auto: GPU when the Ray cluster has one, else CPU with a warning."
    )
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)

    @field_validator("cache_dir")
    @classmethod
    def _expand(cls, v: str) -> str:
        return os.path.abspath(os.path.expanduser(v))

    @model_validator(mode="after")
    def _check(self) -> AppArgs:
        if self.engine.n_ubatch > self.engine.n_batch:
            raise ValueError("engine.n_ubatch must be <= engine.n_batch")
        return self

    def model_name(self) -> str:
        if self.server.served_model_name:
            return self.server.served_model_name
        base = os.path.basename(self.model.filename).replace("*", "")
        stem = base[:-5] if base.endswith(".gguf") else base
        return f"{self.model.repo_id}/{stem}" if self.model.repo_id else stem
