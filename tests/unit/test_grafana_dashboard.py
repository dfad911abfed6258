"""Every metric the shipped Grafana dashboard queries is one this service defines (serve_app/metrics.py), under
the name Ray exports it with (``ray_`` prefix; ``_total`` for counters; ``_bucket/_sum/_count`` for
histograms), so a renamed metric cannot leave a dashboard panel silently empty; and the dashboard covers the
families an operator of a fleet watches."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy/grafana/gguf-serve.json"
METRIC = re.compile(r"\bray_gguf_[a-z0-9_]+")
SUFFIXES = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count")}
# Prompt tokens served from the prefix cache: the panel's counter is defined by the prefix-cache metrics.
DEFINED_ELSEWHERE = {"ray_gguf_prompt_tokens_cached_total"}


def exported_names() -> set[str]:
    """The Prometheus names of every Counter/Gauge/Histogram constructed in serve_app/metrics.py."""
    names: set[str] = set()
    for node in ast.walk(ast.parse((REPO / "serve_app/metrics.py").read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in SUFFIXES:
            first = node.args[0]
            assert isinstance(first, ast.Constant) and isinstance(first.value, str)
            names |= {f"ray_{first.value}{s}" for s in SUFFIXES[node.func.id]}
    return names


def panel_metrics() -> dict[str, set[str]]:
    dash = json.loads(DASHBOARD.read_text())
    return {p["title"]: {m for t in p["targets"] for m in METRIC.findall(t["expr"])} for p in dash["panels"]}


def test_every_panel_queries_only_defined_metrics() -> None:
    known = exported_names() | (DEFINED_ELSEWHERE - exported_names())
    for title, metrics in panel_metrics().items():
        assert metrics, f"panel {title!r} queries no ray_gguf_* metric"
        assert metrics <= known, f"panel {title!r}: undefined {sorted(metrics - known)}"


def test_the_fleet_families_have_panels() -> None:
    used = set().union(*panel_metrics().values())
    for name in ["ray_gguf_time_to_first_token_ms_bucket", "ray_gguf_time_per_output_token_ms_bucket",
                 "ray_gguf_generated_tokens_total", "ray_gguf_queue_depth", "ray_gguf_slots_busy",
                 "ray_gguf_kv_cache_usage_ratio", "ray_gguf_prompt_tokens_cached_total",
                 "ray_gguf_cache_downloads_total"]:
        assert name in used, name


def test_the_parser_sees_what_it_checks() -> None:
    names = exported_names()
    assert {"ray_gguf_requests_total", "ray_gguf_slots_free", "ray_gguf_time_to_first_token_ms_bucket"} <= names
    assert "ray_gguf_slots_free_total" not in names
