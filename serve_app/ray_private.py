"""Every private Ray API the service relies on, in one place (Ray 2.60). Ray may change these in any release;
``tests/unit/test_ray_private.py`` imports each one and checks the signature used here, so an upgrade that breaks
one fails there by name instead of in a replica or a container at start-up. No other module imports a private
Ray name (the same test checks that).

* ``ray._private.services.canonicalize_bootstrap_address``: what ``ray.init`` does with ``RAY_ADDRESS`` (``auto``
  finds the cluster on this machine), used to decide between joining one and starting one here.
* ``ray._private.authentication...maybe_enable_token_auth_if_token_available``: Ray 2.60 uses an available token
  only for a cluster it finds itself; joining an explicit address needs it turned on.
* ``ray.serve._private.constants.SERVE_NAMESPACE``: the namespace Serve's handles live in.
* ``ray.serve._private.api.serve_start`` and ``ServeControllerClient.deploy_apps(config, _blocking=False)``: what
  ``serve run <config>`` does, so the config's ``http_options`` and per-deployment overrides apply.
* ``DeploymentHandle.options(_by_reference=False)``: calls by value over Serve's replica-to-replica gRPC channel
  (the Ingress calling LlamaModel, the RunPod worker calling the Ingress, with ``server.low_latency``).
* ``SERVE_CONTROLLER_NAME`` and the controller's ``get_http_config``: Serve's HTTP options, which no public API
  gives a replica (the Ingress warns when they listen beyond loopback without API keys).
* the controller's ``_all_running_replicas`` (each replica's actor name) and a replica actor's ``handle_request``
  with a pickled ``RequestMetadata`` (what Serve's own router sends): a call on ONE given replica, which no
  public handle offers. ``/stats``, readiness, the RunPod worker's concurrency and the drain reach every
  LlamaModel replica this way (``serve_app.replicas``).
"""

from __future__ import annotations

import asyncio
import pickle
import uuid
from typing import Any

from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
from ray.serve.handle import DeploymentHandle

__all__ = ["SERVE_NAMESPACE", "by_value", "call_replica", "enable_token_auth_if_available", "replica_actors",
           "resolve_address", "serve_http_options", "start_serve_and_deploy"]


def resolve_address(address: str) -> str | None:
    """``host:port`` of the cluster ``address`` names; None for ``local``. Raises ``ConnectionError`` when
    ``auto`` finds no cluster and ``ValueError`` for a malformed address (Ray's own exceptions)."""
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(address)


def enable_token_auth_if_available() -> None:
    """Use ~/.ray/auth_token or RAY_AUTH_TOKEN, when there is one, for an explicitly addressed cluster too."""
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def start_serve_and_deploy(config: Any) -> None:
    """Start Serve on the connected cluster with the config's own options and deploy its applications without
    waiting (the caller waits for readiness itself)."""
    from ray.serve._private.api import serve_start
    from ray.serve.config import gRPCOptions

    client = serve_start(
        http_options=config.http_options.model_dump(),
        proxy_location=config.proxy_location,
        grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
        controller_options=config.controller_options,
    )
    client.deploy_apps(config, _blocking=False)


def by_value(handle: DeploymentHandle) -> DeploymentHandle:
    """The handle with calls sent by value over Serve's direct gRPC channel (about 1 ms less each way than the
    object store)."""
    return handle.options(_by_reference=False)


async def serve_http_options(timeout_s: float) -> tuple[str | None, str | None]:
    """(host, proxy location) of Serve's HTTP options, asked of Serve's controller (the call Serve's own replicas
    make at start). Raises whatever Ray raises when there is no controller or its API changed."""
    import ray

    controller = await asyncio.to_thread(ray.get_actor, SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    opts = await asyncio.wait_for(controller.get_http_config.remote(), timeout_s)
    return opts.host, str(opts.location) if opts.location is not None else None


async def replica_actors(app_name: str, deployment: str, timeout_s: float) -> dict[str, Any]:
    """``{replica id: actor handle}`` of every RUNNING replica of ``deployment`` in ``app_name``, as Serve's
    controller knows them. Raises whatever Ray raises when there is no controller or its API changed."""
    import ray
    from ray.serve._private.common import DeploymentID

    controller = await asyncio.to_thread(ray.get_actor, SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    running = await asyncio.wait_for(controller._all_running_replicas.remote(), timeout_s)
    infos = running.get(DeploymentID(name=deployment, app_name=app_name), [])
    out: dict[str, Any] = {}
    for info in infos:
        out[info.replica_id.unique_id] = await asyncio.to_thread(
            ray.get_actor, info.actor_name, namespace=SERVE_NAMESPACE)
    return out


def call_replica(actor: Any, app_name: str, method: str, *args: Any) -> Any:
    """``method(*args)`` of the deployment's user class on exactly the replica ``actor`` (an awaitable ObjectRef),
    sent the way Serve's router sends a unary handle call."""
    from ray.serve._private.common import RequestMetadata

    rid = uuid.uuid4().hex
    meta = RequestMetadata(request_id=rid, internal_request_id=rid, call_method=method, app_name=app_name)
    return actor.handle_request.remote(pickle.dumps(meta), *args)
