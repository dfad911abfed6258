"""Application metrics through Ray Serve's metrics API, so they appear on the Ray dashboard and its Prometheus
endpoint next to Serve's own (``ray_serve_*``).

Ray adds the ``ray_`` prefix to every name, ``_total`` to counters and ``_bucket/_sum/_count`` to histograms, and
the tags ``application``, ``deployment`` and ``replica``. So ``gguf_requests`` is scraped as
``ray_gguf_requests_total{route=...,status=...}``. The full list is in the README.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

from serve_app.protocol import Done

_MS_BUCKETS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000]
_ITL_MS_BUCKETS = [1, 2.5, 5, 10, 15, 20, 30, 40, 50, 75, 100, 150, 250, 500, 1000, 2500]
_TOKS_BUCKETS = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000]


class IngressMetrics:
    def __init__(self) -> None:
        self.requests = Counter("gguf_requests", description="HTTP requests by route and status code.",
                                tag_keys=("route", "status"))
        self.latency = Histogram("gguf_request_latency_ms", description="Time to the response (headers for a "
                                 "stream) by route.", boundaries=_MS_BUCKETS, tag_keys=("route",))

    def observe(self, route: str, status: int, latency_ms: float) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe(latency_ms, tags={"route": route})


class ModelMetrics:
    def __init__(self) -> None:
        self.ttft = Histogram("gguf_time_to_first_token_ms", description="Arrival to first generated token.",
                              boundaries=_MS_BUCKETS)
        self.e2e = Histogram("gguf_generation_latency_ms", description="Arrival to last token, per request.",
                             boundaries=_MS_BUCKETS)
        self.decode_rate = Histogram("gguf_decode_tokens_per_s", description="Per-request decode speed.",
                                     boundaries=_TOKS_BUCKETS)
        self.prompt_tokens = Counter("gguf_prompt_tokens", description="Prompt tokens processed.")
        # Prompt caching: computed vs reused prompt tokens, and the share reused since the replica started.
        self.prompt_computed = Counter("gguf_prompt_tokens_computed", description="Prompt tokens prefilled.")
        self.prompt_cached = Counter("gguf_prompt_tokens_cached", description="Prompt tokens reused from the "
                                     "prompt cache instead of prefilled.")
        self.cache_hit_ratio = Gauge("gguf_prompt_cache_hit_ratio", description="Prompt tokens reused / prompt "
                                     "tokens, since the replica started.")
        self._n_prompt = self._n_cached = 0
        self.generated_tokens = Counter("gguf_generated_tokens", description="Completion tokens generated.")
        self.finished = Counter("gguf_generations", description="Finished generations by reason.",
                                tag_keys=("reason",))
        self.queue_depth = Gauge("gguf_queue_depth", description="Requests waiting for a slot.")
        self.slots_busy = Gauge("gguf_slots_busy", description="Slots generating or prefilling.")
        self.slots_free = Gauge("gguf_slots_free", description="Idle slots.")
        self.kv_used = Gauge("gguf_kv_cache_used_cells", description="KV cells held by active sequences.")
        self.kv_ratio = Gauge("gguf_kv_cache_usage_ratio", description="KV cells used / total.")
        self.gpu_used = Gauge("gguf_gpu_memory_used_bytes", description="GPU 0 memory in use (NVIDIA only).")
        self.gpu_total = Gauge("gguf_gpu_memory_total_bytes", description="GPU 0 memory size (NVIDIA only).")
        # Inter-token latency (vLLM's time_per_output_token): a request's decode time over its gaps between
        # tokens, observed once per request that produced two tokens or more.
        self.itl = Histogram("gguf_time_per_output_token_ms", description="Mean time between generated tokens, "
                             "per request.", boundaries=_ITL_MS_BUCKETS)
        self.phase = Gauge("gguf_cold_start_phase_seconds", description="Cold-start phases of this replica.",
                           tag_keys=("phase",))

    def observe_finish(self, done: Done) -> None:
        t, u = done.timings, done.usage
        self.ttft.observe(max(t.ttft_ms, 0.0))
        self.e2e.observe(t.ttft_ms + t.decode_ms)
        if t.decode_tokens_per_s > 0:
            self.decode_rate.observe(t.decode_tokens_per_s)
        if u.completion_tokens > 1:
            self.itl.observe(t.decode_ms / (u.completion_tokens - 1))
        self.prompt_tokens.inc(u.prompt_tokens)
        if u.prompt_tokens > u.cached_tokens:
            self.prompt_computed.inc(u.prompt_tokens - u.cached_tokens)
        if u.cached_tokens:
            self.prompt_cached.inc(u.cached_tokens)
        self._n_prompt += u.prompt_tokens
        self._n_cached += u.cached_tokens
        self.cache_hit_ratio.set(self._n_cached / max(1, self._n_prompt))
        if u.completion_tokens:
            self.generated_tokens.inc(u.completion_tokens)
        self.finished.inc(tags={"reason": done.finish_reason})


class CacheMetrics:
    def __init__(self) -> None:
        self.hits = Counter("gguf_cache_hits", description="ensure() served from the volume without download.")
        self.misses = Counter("gguf_cache_misses", description="ensure() that had to download.")
        self.downloads = Counter("gguf_cache_downloads", description="Files downloaded and published.")
        self.download_bytes = Counter("gguf_cache_download_bytes", description="Bytes downloaded.")
        self.verify_failures = Counter("gguf_cache_verification_failures",
                                       description="Files that failed size/sha256 verification.")
        self.errors = Counter("gguf_cache_errors", description="Cache operations that failed, by error code.",
                              tag_keys=("code",))
