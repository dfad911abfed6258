"""LlamaModel's replica options from the app args: a fixed count or Ray Serve autoscaling whose target is the
replica's own capacity.

Ray Serve's autoscaler compares ongoing requests per replica (running + queued at the replica) with
``target_ongoing_requests``. A replica runs ``n_parallel`` sequences at once, so that is the default target: a
replica scales out when requests begin to queue behind its slots, not when it is merely busy.
``max_ongoing_requests`` is slots + the engine's queue + a margin, so the engine (not Ray) decides when to answer
429, and Ray's router still sends at most that many to one replica.
"""

from __future__ import annotations

from typing import Any

from serve_app.config import AppArgs

ROUTER_MARGIN = 8  # requests in transit to a replica while its queue is full; the engine answers them 429


def max_ongoing_requests(args: AppArgs) -> int:
    return args.engine.n_parallel + args.engine.max_queued_requests + ROUTER_MARGIN


def target_ongoing_requests(args: AppArgs) -> float:
    scaling = args.replicas.autoscaling
    if scaling is not None and scaling.target_ongoing_requests is not None:
        return scaling.target_ongoing_requests
    return float(args.engine.n_parallel)


def replica_options(args: AppArgs) -> dict[str, Any]:
    """``num_replicas`` or ``autoscaling_config`` (Ray Serve's own keys) and ``max_ongoing_requests``."""
    opts: dict[str, Any] = {"max_ongoing_requests": max_ongoing_requests(args)}
    scaling = args.replicas.autoscaling
    if scaling is None:
        opts["num_replicas"] = args.replicas.num_replicas
        return opts
    config: dict[str, Any] = {
        "min_replicas": scaling.min_replicas,
        "max_replicas": scaling.max_replicas,
        "target_ongoing_requests": target_ongoing_requests(args),
        "upscale_delay_s": scaling.upscale_delay_s,
        "downscale_delay_s": scaling.downscale_delay_s,
    }
    if scaling.initial_replicas is not None:
        config["initial_replicas"] = scaling.initial_replicas
    if scaling.downscale_to_zero_delay_s is not None:
        config["downscale_to_zero_delay_s"] = scaling.downscale_to_zero_delay_s
    opts["autoscaling_config"] = config
    return opts
