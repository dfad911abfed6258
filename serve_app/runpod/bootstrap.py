"""Start-up of the RunPod worker (``python -m serve_app.runpod``):

1. reads its settings (``serve_app.settings.Settings``; a bad value is one readable line and exit 1);
2. joins the Ray cluster at ``RAY_ADDRESS`` (default ``auto``). When none is running it starts Ray in this process
   and deploys ``GGUF_SERVE_CONFIG`` (default ``./serve_config.yaml``) the way ``serve run <config>`` does, so
   per-deployment overrides in the file apply;
3. waits until ``Ingress.ready()`` says ``ready`` (one readable line and exit 1 on ``failed`` or on timeout);
4. runs ``runpod.serverless.start`` with the async-generator ``handler``, ``return_aggregate_stream`` and a
   ``concurrency_modifier`` that follows the free slots of every LlamaModel replica.

As a load-balancing endpoint (``Settings.runpod_endpoint()``: ``GGUF_SERVE_RUNPOD_MODE=lb``, or ``PORT`` /
``PORT_HEALTH`` set without RunPod's job API) steps 1-3 are the same, with the Serve config's HTTP port set to
``$PORT``; then Ray Serve's proxy serves HTTP and ``/ping`` answers on ``$PORT_HEALTH`` (``serve_app.runpod.lb``).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from typing import Any

import ray
import yaml
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app import ray_private
from serve_app.errors import first_problem, one_line
from serve_app.runpod.handler import (
    READY_CALL_TIMEOUT_S,
    WORKER,
    as_serve_error,
    concurrency_modifier,
    handler,
)
from serve_app.settings import Settings

log = logging.getLogger("serve_app.runpod")


class StartupError(RuntimeError):
    """Why the worker cannot take jobs; printed as one line before exiting 1."""


# ---- settings -----------------------------------------------------------------------------------------------


def env_name(loc: str | None) -> str:
    """The environment variable behind a ``Settings`` error location: a field's prefixed upper-case name, or the
    variable itself for fields read under another library's name (their alias is the location)."""
    if loc is None:
        return "the environment"
    if loc in Settings.model_fields:
        return f"{Settings.model_config.get('env_prefix', '')}{loc}".upper()
    return loc


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as e:
        loc, msg = first_problem(e)
        raise StartupError(f"{env_name(loc)}: {msg}") from None


# ---- joining or starting Ray --------------------------------------------------------------------------------


def _resolve(address: str) -> str | None:
    """``host:port`` of the cluster to join, or None to start one here (``auto`` and nothing running, or local)."""
    try:
        return ray_private.resolve_address(address)
    except ConnectionError as e:  # "auto" and no cluster found on this machine
        if address == "auto":
            return None
        raise StartupError(f"cannot find the Ray cluster '{address}': {one_line(e)}") from None
    except ValueError as e:
        raise StartupError(f"RAY_ADDRESS '{address}' is not a Ray address: {one_line(e)}") from None


def _reachable(hostport: str, timeout_s: float = 5.0) -> bool:
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def connect(address: str, config_path: str, app_name: str, http_port: int | None = None) -> None:
    """Join the cluster, or start Ray here and deploy ``config_path`` (its HTTP port set to ``http_port`` when
    given) when there is none to join."""
    target = _resolve(address)
    if target is not None and not _reachable(target):
        if address != "auto":
            raise StartupError(f"no Ray cluster answers at {target} (RAY_ADDRESS={address})")
        log.warning("the last Ray cluster (%s) is gone; starting one here", target)
        target = None
    if target is None:
        deploy_from_config(config_path, app_name, http_port)
        return
    if http_port is not None:
        log.warning("joining a running cluster: HTTP is served on its Serve proxy's own port, not PORT=%d",
                    http_port)
    ray_private.enable_token_auth_if_available()
    try:
        # The cluster's owner has the replica logs; this process prints its own lines only.
        ray.init(address=target, namespace=ray_private.SERVE_NAMESPACE, log_to_driver=False)
    except Exception as e:
        raise StartupError(f"cannot join the Ray cluster at {target}: {one_line(e)}; a process joining a cluster "
                           "needs its auth token (~/.ray/auth_token or RAY_AUTH_TOKEN; Ray 2.60 turns token "
                           "authentication on by default)") from None
    log.info("joined the Ray cluster at %s", target)


def load_config(path: str, app_name: str) -> Any:
    from ray.serve.schema import ServeDeploySchema

    if not os.path.isfile(path):
        raise StartupError(f"no Ray cluster to join and no Serve config at '{path}' (set RAY_ADDRESS to join a "
                           "cluster, or GGUF_SERVE_CONFIG to the config file)")
    try:
        with open(path) as f:
            config = ServeDeploySchema.model_validate(yaml.safe_load(f))
    except ValidationError as e:
        loc, msg = first_problem(e)
        raise StartupError(f"invalid Serve config '{path}': {loc + ': ' if loc else ''}{msg}") from None
    except (OSError, yaml.YAMLError) as e:
        flat = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())
        raise StartupError(f"cannot read the Serve config '{path}': {one_line(flat)}") from None
    if app_name not in [a.name for a in config.applications]:
        raise StartupError(f"the Serve config '{path}' has no application named '{app_name}'")
    return config


def deploy_from_config(path: str, app_name: str, http_port: int | None = None) -> None:
    """What ``serve run <config>`` does, with the Ray instance owned by this process."""
    config = load_config(path, app_name)
    if http_port is not None:
        config = config.model_copy(update={"http_options": config.http_options.model_copy(
            update={"port": http_port})})
    log.info("no Ray cluster to join: starting Ray here and deploying %s", path)
    ray.init(namespace=ray_private.SERVE_NAMESPACE)
    ray_private.start_serve_and_deploy(config)


# ---- readiness ----------------------------------------------------------------------------------------------

_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)): (.*)$")


def _deploy_failure(message: str) -> str:
    """The exception at the end of a DEPLOY_FAILED traceback, with the lines that explain it, on one line."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    hits = [i for i, ln in enumerate(lines) if _EXC_LINE.match(ln)]
    if not hits:
        return one_line(message)
    m = _EXC_LINE.match(lines[hits[-1]])
    assert m is not None
    parts = [f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2)}"]
    for ln in lines[hits[-1] + 1: hits[-1] + 4]:
        if ln.startswith(("For further information", "System error", "Traceback")):
            break
        parts.append(ln)
    return one_line(" ".join(parts), 400)


def _app_state(app_name: str) -> str | None:
    """None once the application is running; else why not yet. ``StartupError`` when it failed to deploy."""
    try:
        app = serve.status().applications.get(app_name)
    except Exception as e:
        return f"Serve is not reachable yet ({one_line(e)})"
    if app is None:
        return "application not deployed yet"
    if app.status == "DEPLOY_FAILED":
        raise StartupError(f"application '{app_name}' failed to deploy: {_deploy_failure(app.message)}")
    if app.status in ("NOT_STARTED", "DEPLOYING", "DELETING"):
        return f"application {app.status.value}"
    return None


def _model_state(handle: DeploymentHandle) -> tuple[dict[str, Any] | None, str]:
    """``(info, "")`` once the model is ready; else ``(None, why not yet)``. ``StartupError`` when it failed."""
    try:
        info: dict[str, Any] = handle.ready.remote().result(timeout_s=READY_CALL_TIMEOUT_S)
    except Exception as e:
        return None, f"ready() failed: {as_serve_error(e).message}"
    state = info.get("state")
    if state == "ready":
        return info, ""
    if state == "failed":
        raise StartupError(f"model '{info.get('model')}' failed to load: "
                           f"{one_line(info.get('detail') or info.get('reason') or 'no reason given')}")
    return None, f"model {info.get('model')} is {state}"


def wait_until_ready(app_name: str, timeout_s: float) -> tuple[DeploymentHandle, dict[str, Any]]:
    """Block (no event loop runs yet) until the ingress reports ``ready``; ``StartupError`` on failure."""
    deadline = time.monotonic() + timeout_s
    handle: DeploymentHandle | None = None
    last, next_log = "", 0.0
    while time.monotonic() < deadline:
        if time.monotonic() >= next_log and last:
            log.info("waiting for '%s': %s", app_name, last)
            next_log = time.monotonic() + 10
        waiting = _app_state(app_name)
        if waiting is None:
            handle = handle or serve.get_app_handle(app_name)
            info, waiting = _model_state(handle)
            if info is not None:
                log.info("model %s ready (%s slots)", info.get("model"), info.get("slots_total"))
                return handle, info
        last = waiting
        time.sleep(0.5)
    raise StartupError(f"application '{app_name}' not ready after {timeout_s:.0f} s ({last})")


# ---- main ---------------------------------------------------------------------------------------------------


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s runpod-worker: %(message)s")
    try:
        settings = load_settings()
    except StartupError as e:
        print(f"runpod worker cannot start: {e}", file=sys.stderr, flush=True)
        return 1
    if settings.runpod_endpoint() == "lb":
        return main_lb(settings)
    return main_queue(settings)


def main_queue(settings: Settings) -> int:
    """A queue-based endpoint: take jobs from RunPod's job API once the model is ready."""
    try:
        WORKER.cap = settings.runpod_max_concurrency
        WORKER.max_input_bytes = settings.runpod_max_input_bytes
        connect(settings.address(), settings.config, settings.app_name)
        handle, info = wait_until_ready(settings.app_name, settings.runpod_ready_timeout_s)
    except StartupError as e:
        print(f"runpod worker cannot start: {e}", file=sys.stderr, flush=True)
        return 1
    WORKER.attach(handle, info, low_latency=settings.low_latency)

    import runpod  # only now: the SDK reads its env at import and must not take jobs before the model is ready

    runpod.serverless.start({
        "handler": handler,
        "return_aggregate_stream": True,
        "concurrency_modifier": concurrency_modifier,
    })
    return 0


def main_lb(settings: Settings) -> int:
    """A load-balancing endpoint: Ray Serve's proxy serves HTTP on ``$PORT``; ``/ping`` on ``$PORT_HEALTH``."""
    from serve_app.runpod import lb

    # SIGTERM (RunPod stopping the worker) exits through atexit, so a Ray started here is shut down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    health = lb.Health()
    port = settings.health_port()
    if port is not None:
        lb.serve_health(health, port)
    try:
        connect(settings.address(), settings.config, settings.app_name, http_port=settings.port)
        handle, info = wait_until_ready(settings.app_name, settings.runpod_ready_timeout_s)
    except StartupError as e:
        print(f"runpod worker cannot start: {e}", file=sys.stderr, flush=True)
        if port is None:
            return 1
        # The reason stays in the log: /ping's body names no paths.
        health.set({"status": "failed", "reason": "the worker cannot start; see its log"})
        threading.Event().wait()
        return 1
    health.set(lb.ready_body(info))
    log.info("serving HTTP for '%s' (model %s)", settings.app_name, info.get("model"))
    lb.follow(handle, health, threading.Event(), READY_CALL_TIMEOUT_S)
    return 0
