"""``build_app(args)``: the only place the deployment graph is wired.

    Ingress (Starlette, HTTP + handle API)  ->  LlamaModel (engine, GPU)  ->  ModelCache (volume, Hub)

With ``models:``, one LlamaModel (chat) or EmbeddingModel deployment per model, all over the one ModelCache; the
Ingress routes each request by its ``model`` name. With ``max_models_per_replica``, the chat models share one
multiplexed LlamaModel deployment instead (``LlamaPool``), loaded on demand.

``serve_config.yaml`` points ``import_path`` here; Ray Serve validates ``args`` into ``AppArgs`` (unknown keys are
rejected). No ``from __future__ import annotations`` here: Ray reads the annotation at runtime to validate args.
"""

import logging
import re
from typing import Any

import ray
from ray import serve

from serve_app.cache.deployment import MAX_ONGOING as CACHE_MAX_ONGOING
from serve_app.cache.deployment import ModelCache
from serve_app.config import AppArgs, ModelEntry
from serve_app.ingress.deployment import Ingress
from serve_app.model.affinity import router_config
from serve_app.model.deployment import LlamaModel
from serve_app.model.embedding import EmbeddingModel
from serve_app.model.pool import LlamaPool
from serve_app.scaling import ROUTER_MARGIN, max_ongoing_requests, replica_options
from serve_app.settings import Settings

log = logging.getLogger("ray.serve")


def cluster_has_gpu() -> bool:
    if not ray.is_initialized():
        return False
    return float(ray.cluster_resources().get("GPU", 0)) > 0


def resolve_accelerator(args: AppArgs) -> bool:
    """True to run LlamaModel on a GPU. ``auto`` never leaves a replica pending for a GPU that does not exist."""
    if args.accelerator == "gpu":
        return True
    if args.accelerator == "cpu":
        return False
    if cluster_has_gpu():
        return True
    log.warning("accelerator=auto: the Ray cluster has no GPU, so LlamaModel runs on the CPU (slow for large "
                "models). Set accelerator: gpu to require one.")
    return False


# Ray Serve runs user code on a second event loop in its own thread and, in callers, the request router on a
# third; every request and every streamed item crosses those threads. On the token path (Ingress, LlamaModel)
# that cost 2-4 ms of time to first token on a 2-core CPU (docs/benchmarks.md), and both deployments keep blocking work off their loop (the
# engine has its own thread), so they run on the replica's main loop. ModelCache hashes files and keeps the default.
# These are Ray Serve's documented throughput-mode switches (RAY_SERVE_THROUGHPUT_OPTIMIZED sets them too); a
# value already in the environment wins (``Settings.ray_serve_loop_overrides``).
LOW_LATENCY_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


def token_path_actor_options(args: AppArgs, num_cpus: float, num_gpus: float = 0) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if args.server.low_latency:
        opts["runtime_env"] = {"env_vars": {**LOW_LATENCY_ENV, **Settings().ray_serve_loop_overrides()}}
    return opts


def model_cache_options() -> dict[str, Any]:
    """Every ModelCache option (its decorator sets none): light (0 CPU), its blocking work in a thread pool."""
    return {"ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": CACHE_MAX_ONGOING}


def ingress_options(args: AppArgs) -> dict[str, Any]:
    """Every Ingress option (its decorator sets none): light (0 CPU), many concurrent streams."""
    return {"ray_actor_options": token_path_actor_options(args, 0), "max_ongoing_requests": 1024,
            "graceful_shutdown_timeout_s": 30}


def llama_model_options(args: AppArgs, use_gpu: bool) -> dict[str, Any]:
    """Every LlamaModel option (its decorator sets none), so a ``deployments:`` entry of the Serve config
    overrides exactly these."""
    return {
        "ray_actor_options": token_path_actor_options(args, 1, 1 if use_gpu else 0),
        **replica_options(args),  # num_replicas or autoscaling_config; max_ongoing_requests above slots + queue
        "user_config": args.batching.model_dump(),
        "health_check_period_s": 10,
        "graceful_shutdown_timeout_s": 30,
        **llama_model_routing(args),
    }


def embedding_model_options(args: AppArgs, use_gpu: bool) -> dict[str, Any]:
    """Every EmbeddingModel option: one call embeds at a time (its inputs batched), so a short queue is enough."""
    return {"ray_actor_options": token_path_actor_options(args, 1, 1 if use_gpu else 0),
            "max_ongoing_requests": 64, "health_check_period_s": 10, "graceful_shutdown_timeout_s": 30}


def deployment_name(kind: str, name: str, several: bool) -> str:
    """``LlamaModel`` for the one-model shorthand (the name Serve configs override); with ``models:``, one
    deployment per model, named after it (Ray Serve names allow no '/' or '#')."""
    base = "EmbeddingModel" if kind == "embedding" else "LlamaModel"
    return f"{base}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}" if several else base


def model_deployment(args: AppArgs, entry: ModelEntry, cache: Any, use_gpu: bool) -> Any:
    """One model's deployment, bound: a LlamaModel (chat) or an EmbeddingModel, with the entry's own args."""
    one = args.for_entry(entry)
    name = deployment_name(entry.kind, args.entry_name(entry), bool(args.models))
    if entry.kind == "embedding":
        return EmbeddingModel.options(name=name, **embedding_model_options(one, use_gpu)).bind(
            cache, one.model_dump(mode="json"), use_gpu, entry.pooling, entry.normalize)
    return LlamaModel.options(name=name, **llama_model_options(one, use_gpu)).bind(
        cache, one.model_dump(mode="json"), use_gpu)


POOL_DEPLOYMENT = "LlamaModel"


def pool_options(args: AppArgs, use_gpu: bool) -> dict[str, Any]:
    """The pool's options: LlamaModel's (replicas, routing, GPU), with room for every held model's slots and queue
    at once (the largest model's figures, N times)."""
    opts = llama_model_options(args, use_gpu)
    opts.pop("user_config", None)  # admission batching windows are per engine; pooled engines admit directly
    per_model = max(max_ongoing_requests(args.for_entry(e)) - ROUTER_MARGIN for e in args.pooled())
    opts["max_ongoing_requests"] = per_model * args.max_models_per_replica + ROUTER_MARGIN
    return opts


def pool_deployment(args: AppArgs, cache: Any, use_gpu: bool) -> Any:
    """The chat models of ``models:`` on demand behind one deployment (``max_models_per_replica`` >= 1), each with
    its own engine args."""
    entries = {args.entry_name(e): args.for_entry(e).model_dump(mode="json") for e in args.pooled()}
    return LlamaPool.options(name=POOL_DEPLOYMENT, **pool_options(args, use_gpu)).bind(
        cache, entries, use_gpu, args.max_models_per_replica, args.eviction_grace_s, POOL_DEPLOYMENT)


def llama_model_routing(args: AppArgs) -> dict[str, Any]:
    """Prefix affinity across LlamaModel replicas (``routing``): a no-op with one replica, so always set."""
    r = args.routing
    threshold = r.imbalance_threshold if r.imbalance_threshold is not None else args.engine.n_parallel
    config = router_config(r.prefix_affinity, threshold, r.prompt_key_chars, args.engine.n_parallel)
    return {} if config is None else {"request_router_config": config}


def build_app(args: AppArgs) -> serve.Application:
    if isinstance(args, dict):
        args = AppArgs.model_validate(args)
    use_gpu = resolve_accelerator(args)
    cache = ModelCache.options(**model_cache_options()).bind(args.cache_dir, args.download.model_dump())
    # By default one deployment per model: each owns a batching engine sized to its slots, loads once, keeps its
    # readiness state and scales on its own. With max_models_per_replica the chat models share one multiplexed
    # deployment that loads them on demand (serve_app.model.pool); see docs/models.md.
    pooled = {args.entry_name(e) for e in args.pooled()}
    pool = pool_deployment(args, cache, use_gpu) if pooled else None
    bound = [(args.entry_name(e), e.kind, pool if args.entry_name(e) in pooled else
              model_deployment(args, e, cache, use_gpu)) for e in args.served()]
    (first_name, first_kind, first), others = bound[0], bound[1:]
    return Ingress.options(**ingress_options(args)).bind(
        first, first_name, args.server, args.engine.max_tokens_default, others, first_kind, sorted(pooled))
