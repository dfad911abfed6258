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
    # Prompt caching and the sliding-window cache.
    swa_full: bool = Field(
        default=False,
        description="Full-size KV for sliding-window (SWA) layers (Gemma 2/3 and others). Off, as in llama-server: "
                    "those layers hold only their window, far less memory, but a cached prompt prefix is reusable "
                    "only while its window is still held. No effect on models without SWA.",
    )
    cache_ram_mib: int = Field(
        default=1024, ge=0,
        description="Host-memory prompt cache beyond the slots (llama-server --cache-ram), in MiB: an idle slot's "
                    "sequence state is saved there before another prefix takes the slot, and loaded back when a "
                    "later prompt shares a longer prefix with it. 0 turns it off.",
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


# ---- several models in one application: ``models:`` entries (``model:`` stays the one-model shorthand) ----------

ModelKind = Literal["chat", "embedding"]


class ModelEntry(ModelRef):
    """One served model: where it comes from, the name clients ask for, what it does, and engine overrides."""

    name: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$",
        description="The model id in the API (the request's 'model'); default: repo/file stem. No ':' (reserved "
                    "for 'base:adapter' names).",
    )
    kind: ModelKind = Field(
        default="chat", description="chat: /v1/chat/completions and /v1/completions. embedding: /v1/embeddings "
                                    "(a context with embeddings on and the model's pooling).",
    )
    engine: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the app's engine.* for this model only (e.g. n_parallel).",
    )
    normalize: bool = Field(default=True, description="embedding: L2-normalise each vector (most model cards say so).")
    pooling: Literal["model", "mean", "cls", "last"] = Field(
        default="model", description="embedding: the model's own pooling type (from the GGUF), or this one. A model "
                                     "that declares none gets mean.",
    )

    @model_validator(mode="after")
    def _overrides(self) -> ModelEntry:
        EngineConfig.model_validate(self.engine)  # unknown or invalid keys fail at deploy time
        return self

    def ref(self) -> ModelRef:
        return ModelRef(repo_id=self.repo_id, filename=self.filename, revision=self.revision)


# Routing across LlamaModel replicas.
class RoutingConfig(_Strict):
    """How callers pick a LlamaModel replica when there are several (``serve_app.model.affinity``)."""

    prefix_affinity: bool = Field(
        default=True,
        description="Send every turn of a conversation (same system and first user message; for a raw prompt, "
                    "the same first prompt_key_chars characters) to the same replica, where its prefix is cached. "
                    "Off: Ray Serve's power-of-two-choices load balancing. No effect with one replica.",
    )
    imbalance_threshold: int | None = Field(
        default=None, ge=0,
        description="Give up affinity for a request when its replica has this many more requests in flight than "
                    "the least loaded one (then the least loaded of the others takes it). Default: engine.n_parallel. "
                    "Whatever the threshold, a replica whose slots are all taken yields to one with a free slot.",
    )
    prompt_key_chars: int = Field(
        default=256, ge=1,
        description="For raw prompts (/v1/completions): how many leading characters name the conversation. "
                    "Shorter than the shortest turn's prompt, or turns of one conversation part ways.",
    )


# ---- replicas and autoscaling of LlamaModel ----------------------------------------------------------------------


class AutoscalingArgs(_Strict):
    """Ray Serve autoscaling for LlamaModel, on ongoing requests per replica (running + queued at it)."""

    min_replicas: int = Field(default=1, ge=0, description="0 = scale to zero when idle (the next request waits "
                                                            "for a cold start).")
    max_replicas: int = Field(default=1, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float | None = Field(
        default=None, gt=0, description="Default: engine.n_parallel, so a replica scales out when requests start "
                                        "to queue behind its slots.")
    upscale_delay_s: float = Field(default=10.0, ge=0)
    downscale_delay_s: float = Field(default=300.0, ge=0, description="Long: a model load is expensive.")
    downscale_to_zero_delay_s: float | None = Field(default=None, ge=0,
                                                    description="The last replica's delay (min_replicas 0).")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingArgs:
        if self.min_replicas > self.max_replicas:
            raise ValueError("replicas.autoscaling: min_replicas must be <= max_replicas")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("replicas.autoscaling: initial_replicas must lie in [min_replicas, max_replicas]")
        return self


class ReplicaArgs(_Strict):
    """How many LlamaModel replicas: a fixed ``num_replicas`` or an ``autoscaling`` range, not both."""

    num_replicas: int = Field(default=1, ge=1, description="Fixed replica count.")
    autoscaling: AutoscalingArgs | None = None

    @model_validator(mode="after")
    def _one_way(self) -> ReplicaArgs:
        if self.autoscaling is not None and self.num_replicas != 1:
            raise ValueError("replicas: give num_replicas or autoscaling, not both")
        return self


class AppArgs(_Strict):
    """The ``args`` of the ``llm`` application."""

    model: ModelRef | None = Field(default=None, description="One model (shorthand for a one-entry 'models').")
    models: list[ModelEntry] = Field(
        default_factory=list, description="Several models in one app; each runs in its own deployment.",
    )
    cache_dir: str = Field(default="./models", description="The model volume (RunPod: /runpod-volume/models).")
    accelerator: Literal["auto", "gpu", "cpu"] = Field(
        default="auto", description="auto: GPU when the Ray cluster has one, else CPU with a warning."
    )
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    replicas: ReplicaArgs = Field(default_factory=ReplicaArgs)
    max_models_per_replica: int = Field(
        default=0, ge=0,
        description="0: each model in its own deployment, loaded at start and kept. N >= 1: the chat models of "
                    "'models' share one LlamaModel deployment (one GPU per replica): a replica loads a model on "
                    "its first request and holds at most N, unloading the least recently used one (llama-server "
                    "--models-max, Ollama). Requests go to a replica that holds their model.",
    )
    eviction_grace_s: float = Field(
        default=30.0, ge=0,
        description="How long an unloaded model's running requests may finish before they are ended with a "
                    "retryable 'model_unloaded' error (max_models_per_replica >= 1).",
    )

    @field_validator("cache_dir")
    @classmethod
    def _expand(cls, v: str) -> str:
        return os.path.abspath(os.path.expanduser(v))

    @model_validator(mode="after")
    def _check(self) -> AppArgs:
        if self.engine.n_ubatch > self.engine.n_batch:
            raise ValueError("engine.n_ubatch must be <= engine.n_batch")
        if (self.model is None) == (not self.models):
            raise ValueError("give exactly one of 'model' (one model) or 'models' (a list)")
        if self.models and self.server.served_model_name:
            raise ValueError("server.served_model_name applies to 'model' only; name each of 'models' instead")
        names = [self.entry_name(e) for e in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        if self.max_models_per_replica and not any(e.kind == "chat" for e in self.models):
            raise ValueError("max_models_per_replica applies to the chat models of 'models'; there are none")
        for e in self.models:
            merged = EngineConfig.model_validate({**self.engine.model_dump(), **e.engine})
            if merged.n_ubatch > merged.n_batch:
                raise ValueError(f"models[{self.entry_name(e)}].engine: n_ubatch must be <= n_batch")
        return self

    def model_name(self) -> str:
        """The served name of the one model (``model:``), or of the first entry of ``models:``."""
        if self.model is None:
            return self.entry_name(self.models[0])
        if self.server.served_model_name:
            return self.server.served_model_name
        return _stem_name(self.model)

    @staticmethod
    def entry_name(entry: ModelEntry) -> str:
        return entry.name or _stem_name(entry)

    def served(self) -> list[ModelEntry]:
        """Every served model as an entry, ``model:`` included (as one chat entry)."""
        if self.model is not None:
            # Constructed, not validated: server.served_model_name may be any string.
            return [ModelEntry.model_construct(**self.model.model_dump(), name=self.model_name())]
        return list(self.models)

    def pooled(self) -> list[ModelEntry]:
        """The models served on demand by one multiplexed LlamaModel deployment (``max_models_per_replica``)."""
        if not self.max_models_per_replica:
            return []
        return [e for e in self.models if e.kind == "chat"]

    def for_entry(self, entry: ModelEntry) -> AppArgs:
        """The one-model args a model deployment runs with: its ref, name and engine overrides."""
        return self.model_copy(update={
            "model": entry.ref(), "models": [], "max_models_per_replica": 0,
            "engine": EngineConfig.model_validate({**self.engine.model_dump(), **entry.engine}),
            "server": self.server.model_copy(update={"served_model_name": self.entry_name(entry)}),
        })


def _stem_name(ref: ModelRef) -> str:
    base = os.path.basename(ref.filename).replace("*", "")
    stem = base[:-5] if base.endswith(".gguf") else base
    return f"{ref.repo_id}/{stem}" if ref.repo_id else stem
