"""``build_app(args)``: the only place the deployment graph is wired.

    Ingress (Starlette, HTTP + handle API)  ->  LlamaModel (engine, GPU)  ->  ModelCache (volume, Hub)

``serve_config.yaml`` points ``import_path`` here; Ray Serve validates ``args`` into ``AppArgs`` (unknown keys are
rejected). No ``from __future__ import annotations`` here: Ray reads the annotation at runtime to validate args.
"""

import logging
from typing import Any

import ray
from ray import serve

from serve_app.cache.deployment import ModelCache
from serve_app.config import AppArgs
from serve_app.ingress.deployment import Ingress
from serve_app.llama_model import LlamaModel

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


def llama_model_options(args: AppArgs, use_gpu: bool) -> dict[str, Any]:
    return {
        "ray_actor_options": {"num_cpus": 1, "num_gpus": 1 if use_gpu else 0},
        # Above slots + queue, so the engine (not Ray) decides when to answer 429.
        "max_ongoing_requests": args.engine.n_parallel + args.engine.max_queue + 8,
        "user_config": args.batching.model_dump(),
    }


def build_app(args: AppArgs) -> serve.Application:
    if isinstance(args, dict):
        args = AppArgs.model_validate(args)
    use_gpu = resolve_accelerator(args)
    cache = ModelCache.bind(args.cache_dir, args.download.model_dump())
    model = LlamaModel.options(**llama_model_options(args, use_gpu)).bind(
        cache, args.model_dump(mode="json"), use_gpu)
    return Ingress.bind(model, args.model_name(), args.server.model_dump(), args.engine.max_tokens_default)
