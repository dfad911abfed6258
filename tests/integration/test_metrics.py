"""After a few requests, Ray's Prometheus endpoint serves our documented metric names with non-zero values, and
the ingress serves the same text at GET /metrics (where clients send requests)."""

from __future__ import annotations

import os
import re
import time

import httpx
import pytest

pytestmark = pytest.mark.timeout(120)

EXPECTED_NONZERO = [
    "ray_gguf_requests_total",
    "ray_gguf_request_latency_ms_count",
    "ray_gguf_time_to_first_token_ms_count",
    "ray_gguf_generation_latency_ms_count",
    "ray_gguf_time_per_output_token_ms_count",
    "ray_gguf_prompt_tokens_total",
    "ray_gguf_generated_tokens_total",
    "ray_gguf_generations_total",
    "ray_gguf_slots_free",
    "ray_gguf_cold_start_phase_seconds",
    "ray_gguf_cache_misses_total",
    "ray_gguf_cache_downloads_total",
    "ray_gguf_cache_download_bytes_total",
]
EXPECTED_PRESENT = ["ray_gguf_queue_depth", "ray_gguf_slots_busy", "ray_gguf_kv_cache_used_cells",
                    "ray_gguf_kv_cache_usage_ratio"]


last_text = ""


def scrape() -> dict[str, float]:
    global last_text
    text = last_text = httpx.get(f"http://127.0.0.1:{os.environ['GGUF_TEST_METRICS_PORT']}/metrics", timeout=10).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(ray_gguf_[a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+)$", line)
        if m:
            values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(3))
    return values


def test_documented_metrics_are_exported(llm_app: str) -> None:
    for _ in range(3):
        r = httpx.post(f"{llm_app}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, timeout=30)
        assert r.status_code == 200
    deadline = time.time() + 60
    while True:
        values = scrape()
        missing = [n for n in EXPECTED_NONZERO if values.get(n, 0) <= 0] + [
            n for n in EXPECTED_PRESENT if n not in values]
        if not missing or time.time() > deadline:
            break
        time.sleep(1)
    assert not missing, (missing, [ln for ln in last_text.splitlines() if "cold" in ln])


def test_ingress_serves_the_node_metrics(llm_app: str) -> None:
    r = httpx.get(f"{llm_app}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "ray_gguf_requests_total" in r.text and "ray_serve_" in r.text
