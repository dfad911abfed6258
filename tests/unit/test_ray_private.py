"""Invariant: every private Ray API the service uses (all of them wrapped in ``serve_app.ray_private``, and no
other module touches one) still exists in the installed Ray with the signature and behaviour the
wrapper relies on. A Ray upgrade that changes one fails here, by name, instead of in a container at start-up."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "serve_app"


def params(fn: object) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)  # type: ignore[arg-type]


def test_canonicalize_bootstrap_address() -> None:
    from ray._private.services import canonicalize_bootstrap_address

    assert list(params(canonicalize_bootstrap_address))[:1] == ["addr"]
    assert canonicalize_bootstrap_address("local") is None  # "start one here"
    assert canonicalize_bootstrap_address("10.1.2.3:6379") == "10.1.2.3:6379"
    with pytest.raises(ValueError):
        canonicalize_bootstrap_address("not:an:address")


def test_token_auth_setup() -> None:
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    assert "warn_if_disabled" in params(maybe_enable_token_auth_if_token_available)


def test_serve_namespace() -> None:
    from ray.serve._private.constants import SERVE_NAMESPACE

    from serve_app import ray_private

    assert SERVE_NAMESPACE == ray_private.SERVE_NAMESPACE == "serve"


def test_serve_start_and_deploy_apps() -> None:
    from ray.serve._private.api import serve_start
    from ray.serve._private.client import ServeControllerClient

    p = params(serve_start)
    assert {"http_options", "grpc_options", "controller_options", "proxy_location"} <= set(p)
    assert inspect.signature(serve_start).return_annotation in (ServeControllerClient, "ServeControllerClient")
    deploy = params(ServeControllerClient.deploy_apps)
    assert list(deploy)[:2] == ["self", "config"] and "_blocking" in deploy


def test_handle_by_value_option() -> None:
    from ray.serve.handle import DeploymentHandle

    assert "_by_reference" in params(DeploymentHandle.options)


def test_the_config_options_serve_start_gets() -> None:
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate({"applications": []})
    for attr in ("http_options", "grpc_options", "proxy_location", "controller_options"):
        assert hasattr(config, attr), attr
    gRPCOptions(**config.grpc_options.model_dump())


def test_serve_controller_http_config() -> None:
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME
    from ray.serve._private.controller import ServeController

    assert SERVE_CONTROLLER_NAME
    # Ray adds a keyword-only ``_ray_trace_ctx`` when tracing hooks are on: nothing else may be required.
    extra = [p for n, p in params(ServeController.get_http_config).items() if n != "self"]
    assert all(p.default is not p.empty or p.name.startswith("_ray") for p in extra), extra


def test_one_replica_calls() -> None:
    """``replica_actors``: the controller's running replicas by deployment; ``call_replica``: a unary user-method
    call on one replica actor, with the metadata Serve's router sends."""
    from ray.serve._private.common import DeploymentID, ReplicaID, RequestMetadata, RunningReplicaInfo
    from ray.serve._private.controller import ServeController
    from ray.serve._private.replica import ReplicaActor

    extra = [p for n, p in params(ServeController._all_running_replicas).items() if n != "self"]
    assert all(p.default is not p.empty or p.name.startswith("_ray") for p in extra), extra
    assert {"actor_name", "replica_id"} <= set(RunningReplicaInfo.__dataclass_fields__)
    assert "unique_id" in ReplicaID.__dataclass_fields__
    assert DeploymentID(name="LlamaModel", app_name="llm") == DeploymentID("LlamaModel", "llm")
    assert list(params(ReplicaActor.handle_request))[:2] == ["self", "pickled_request_metadata"]
    meta = RequestMetadata(request_id="r", internal_request_id="r", call_method="info", app_name="llm")
    assert not (meta.is_http_request or meta.is_grpc_request or meta.is_streaming)


def test_no_other_module_imports_a_private_ray_api() -> None:
    private = re.compile(r"^\s*(from|import)\s+ray\.(\w+\.)*_private\b", re.M)
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if p.name != "ray_private.py" and private.search(p.read_text())]
    assert offenders == []
