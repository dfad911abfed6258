"""LlamaModel's replica options: a fixed count or autoscaling whose target defaults to the replica's slots, and
a max_ongoing_requests above slots + queue so the engine (not Ray) answers 429; contradictory settings fail at
deploy time."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.builder import llama_model_options
from serve_app.config import AppArgs

MODEL = {"filename": "/m.gguf"}


def args(**kw: object) -> AppArgs:
    return AppArgs.model_validate({"model": MODEL, **kw})


def test_fixed_replica_count() -> None:
    opts = llama_model_options(args(replicas={"num_replicas": 3}), use_gpu=False)
    assert opts["num_replicas"] == 3 and "autoscaling_config" not in opts


def test_autoscaling_target_defaults_to_slots_and_limit_covers_slots_and_queue() -> None:
    a = args(engine={"n_parallel": 6, "max_queued_requests": 20},
             replicas={"autoscaling": {"min_replicas": 0, "max_replicas": 3}})
    opts = llama_model_options(a, use_gpu=False)
    auto = opts["autoscaling_config"]
    assert auto["target_ongoing_requests"] == 6 and auto["min_replicas"] == 0 and auto["max_replicas"] == 3
    assert "num_replicas" not in opts
    assert opts["max_ongoing_requests"] > 6 + 20


def test_explicit_target_wins() -> None:
    a = args(replicas={"autoscaling": {"max_replicas": 2, "target_ongoing_requests": 3}})
    assert llama_model_options(a, use_gpu=False)["autoscaling_config"]["target_ongoing_requests"] == 3


@pytest.mark.parametrize("replicas", [
    {"num_replicas": 2, "autoscaling": {"max_replicas": 2}},
    {"autoscaling": {"min_replicas": 3, "max_replicas": 2}},
    {"autoscaling": {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 5}},
    {"num_replicas": 0},
])
def test_contradictions_fail_at_deploy_time(replicas: dict) -> None:
    with pytest.raises(ValidationError):
        args(replicas=replicas)


def test_options_are_valid_for_ray_serve() -> None:
    from ray.serve.config import AutoscalingConfig

    a = args(replicas={"autoscaling": {"min_replicas": 0, "max_replicas": 4, "downscale_to_zero_delay_s": 600}})
    AutoscalingConfig(**llama_model_options(a, use_gpu=False)["autoscaling_config"])
