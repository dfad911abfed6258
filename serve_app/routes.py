"""The one route table: every HTTP path the Ingress serves, which are OpenAI generation routes (and so also
RunPod ``openai_route`` values), their response id prefix (and ``response_id``, the one builder of response ids),
and which stay open without an API key."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    method: Literal["GET", "POST"]
    name: str  # the service method that answers it
    id_prefix: str | None = None  # OpenAI response id prefix (chatcmpl-..., cmpl-...) for generation routes
    open: bool = False  # answered without an API key (probes)
    openai: bool = False  # reachable as a RunPod ``openai_route``


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MODELS = "/v1/models"
EMBEDDINGS = "/v1/embeddings"

ROUTES: tuple[Route, ...] = (
    Route(CHAT, "POST", "chat", id_prefix="chatcmpl", openai=True),
    Route(COMPLETIONS, "POST", "completions", id_prefix="cmpl", openai=True),
    Route(MODELS, "GET", "models", openai=True),
    Route(EMBEDDINGS, "POST", "embeddings", id_prefix="embd", openai=True),
    Route("/tokenize", "POST", "tokenize"),
    Route("/detokenize", "POST", "detokenize"),
    Route("/health", "GET", "health", open=True),
    Route("/v1/health", "GET", "health", open=True),
    Route("/ready", "GET", "ready", open=True),
    Route("/ping", "GET", "ping", open=True),  # RunPod load-balancing endpoints' probe (ingress/ping.py)
    Route("/stats", "GET", "stats"),
    # The Ray node's Prometheus export, relayed (ingress/node_metrics.py); behind the API key like /stats.
    Route("/metrics", "GET", "metrics"),
)

BY_PATH: dict[str, Route] = {r.path: r for r in ROUTES}
OPEN_PATHS: frozenset[str] = frozenset({r.path for r in ROUTES if r.open} | {"/"})
OPENAI_ROUTES: tuple[str, ...] = tuple(r.path for r in ROUTES if r.openai)


def response_id(path: str, suffix: str | None = None) -> str:
    """The id of a response on route ``path``: ``<id_prefix>-<suffix>`` (``chatcmpl-...``), the suffix being the
    request's own id (HTTP request id, RunPod job id) or a fresh random one. A route without a prefix
    (``/v1/models`` as a RunPod job) gets ``req-...``, so every call the ingress receives still has an id to log."""
    prefix = BY_PATH[path].id_prefix or "req"
    return f"{prefix}-{suffix or uuid.uuid4().hex[:24]}"
