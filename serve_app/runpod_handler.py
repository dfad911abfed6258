"""RunPod serverless worker: each job becomes one call on the ``llm`` application's ingress, through its Ray handle.

``python -m serve_app.runpod_handler`` (the container command):

1. joins the Ray cluster at ``RAY_ADDRESS`` (default ``auto``). When none is running it starts Ray in this process
   and deploys ``SERVE_CONFIG`` (default ``./serve_config.yaml``) the way ``serve run <config>`` does, so
   per-deployment overrides in the file apply;
2. waits until ``Ingress.ready()`` says ``ready`` (one readable line and exit 1 on ``failed`` or on timeout);
3. runs ``runpod.serverless.start`` with the async-generator ``handler``, ``return_aggregate_stream`` and a
   ``concurrency_modifier`` that follows the engine's slots.

The handler validates the job (``serve_app.runpod_input``), makes one ingress call and yields one OpenAI response
dict, or the ``data: ...`` SSE strings of a stream ending with ``data: [DONE]``. Every failure is a value,
``{"error": {"message", "type", "param", "code"}}``: no traceback reaches a client and a bad job never stops the
worker. The engine and llama_cpp are never imported here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import ray
import yaml
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.errors import NotReadyError, ServeError
from serve_app.ray_errors import ray_failure, unwrap_cause
from serve_app.runpod_input import IngressCall, normalise

log = logging.getLogger("serve_app.runpod")

REFRESH_S = 0.5  # how often the concurrency cache is refreshed from Ingress.ready()
READY_CALL_TIMEOUT_S = 10.0


class StartupError(RuntimeError):
    """Why the worker cannot take jobs; printed as one line before exiting 1."""


def one_line(text: object, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    out = lines[0] if lines else ""
    return out if len(out) <= limit else out[: limit - 3] + "..."


def error_body(err: ServeError) -> dict[str, Any]:
    return {"error": err.to_dict()}


def as_serve_error(exc: BaseException) -> ServeError:
    """Any exception from the Ray call as a typed, client-readable error (never a traceback)."""
    typed = ray_failure(exc)
    if typed is not None:
        return typed
    cause = unwrap_cause(exc)
    detail = one_line(cause)
    return ServeError(f"worker error: {type(cause).__name__}{': ' + detail if detail else ''}")


# ---- concurrency --------------------------------------------------------------------------------------------


def concurrency_target(info: dict[str, Any], in_flight: int, cap: int | None) -> int | None:
    """How many jobs this worker should hold, from ``Ingress.ready()``; None when the engine gives no figures.

    ``slots_total - slots_busy - waiting`` are the free slots; the jobs this worker is already running are counted
    back in, because the SDK's concurrency is the number of jobs in flight, not new ones (and it stops taking jobs
    until it is idle whenever the value changes, so it must stay steady under our own load).
    """
    total = int(info.get("slots_total") or 0)
    if info.get("state") != "ready" or total <= 0:
        return None
    free = total - int(info.get("slots_busy") or 0) - int(info.get("waiting") or 0)
    upper = min(total, cap) if cap else total
    return max(1, min(upper, free + in_flight))


class Worker:
    """The ingress handle, the jobs in flight and the cached concurrency (read in the SDK's tight loop)."""

    def __init__(self, cap: int | None = None) -> None:
        self.handle: DeploymentHandle | None = None
        self.cap = cap
        self.in_flight = 0
        self.concurrency = 1
        self._pending: int | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._refresh_errors = 0

    def attach(self, handle: DeploymentHandle, info: dict[str, Any]) -> None:
        self.handle = _by_value(handle)
        self.concurrency = concurrency_target(info, 0, self.cap) or 1

    def ingress(self) -> DeploymentHandle:
        if self.handle is None:
            raise NotReadyError("the worker is not connected to the model server yet")
        return self.handle

    def observe(self, target: int | None) -> None:
        """Adopt a new value once two refreshes in a row agree (one stray sample must not stall the SDK)."""
        if target is None or target == self.concurrency:
            self._pending = None
        elif target == self._pending:
            log.info("concurrency %d -> %d", self.concurrency, target)
            self.concurrency, self._pending = target, None
        else:
            self._pending = target

    def modifier(self, current: int) -> int:
        """``concurrency_modifier``: O(1); starts the refresher on the SDK's event loop the first time."""
        if self._refresher is None and self.handle is not None:
            try:
                self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())
            except RuntimeError:
                pass  # not inside a loop: keep the cached value
        return self.concurrency

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                info = await asyncio.wait_for(_await(self.ingress().ready.remote()), READY_CALL_TIMEOUT_S)
            except Exception as e:  # keep the last value; the jobs themselves report a dead server
                self._refresh_errors += 1
                if self._refresh_errors in (1, 10) or self._refresh_errors % 100 == 0:
                    log.warning("concurrency refresh failed (%d times): %s", self._refresh_errors,
                                as_serve_error(e).message)
                continue
            self._refresh_errors = 0
            self.observe(concurrency_target(info, self.in_flight, self.cap))


async def _await(resp: Any) -> Any:
    return await resp


WORKER = Worker()


def concurrency_modifier(current: int) -> int:
    return WORKER.modifier(current)


# ---- the handler --------------------------------------------------------------------------------------------


async def handler(job: dict[str, Any]) -> AsyncIterator[dict[str, Any] | str]:
    """One RunPod job: one OpenAI response dict, or SSE strings (``data: {...}\\n\\n`` ... ``data: [DONE]\\n\\n``),
    or one ``{"error": {...}}``."""
    try:
        call = normalise(job.get("input"))
        ingress = WORKER.ingress()
    except Exception as e:  # InvalidRequestError / NotReadyError, or anything unexpected: still a value
        yield error_body(as_serve_error(e))
        return
    request_id = f"{call.id_prefix}-{job.get('id') or uuid.uuid4().hex}"
    WORKER.in_flight += 1
    try:
        if call.stream:
            async for item in _stream(ingress, call, request_id):
                yield item
        else:
            yield await _unary(ingress, call, request_id)
    except Exception as e:  # Ray errors (a dead actor, backpressure, ...): an error item, even mid-stream
        log.warning("job %s failed: %s: %s", request_id, type(e).__name__, one_line(e))
        yield error_body(as_serve_error(e))
    finally:
        WORKER.in_flight -= 1


def _by_value(ingress: DeploymentHandle) -> DeploymentHandle:
    """Jobs go to the ingress over Ray Serve's direct gRPC channel (about 1 ms less each way than the object
    store); ``GGUF_SERVE_LOW_LATENCY=0`` keeps Ray's default."""
    if os.environ.get("GGUF_SERVE_LOW_LATENCY", "1") == "0":
        return ingress
    return ingress.options(_by_reference=False)


async def _unary(ingress: DeploymentHandle, call: IngressCall, request_id: str) -> dict[str, Any]:
    resp = ingress.openai.remote(call.route, call.body, request_id=request_id)
    try:
        out = await resp
    except asyncio.CancelledError:  # RunPod stopped the job: awaiting alone would not stop the request
        resp.cancel()
        raise
    if not isinstance(out, dict):
        return error_body(ServeError(f"the model server returned {type(out).__name__}, not a response"))
    return out


async def _stream(ingress: DeploymentHandle, call: IngressCall,
                  request_id: str) -> AsyncIterator[dict[str, Any] | str]:
    gen = ingress.options(stream=True).openai_stream.remote(call.route, call.body, request_id=request_id)
    finished = False
    try:
        async for item in gen:
            yield item
        finished = True
    finally:
        if not finished:  # stopped, failed, or the consumer went away: free the engine slot
            gen.cancel()


# ---- startup ------------------------------------------------------------------------------------------------


def _resolve(address: str) -> str | None:
    """``host:port`` of the cluster to join, or None to start one here (``auto`` and nothing running, or local)."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address(address)
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


def connect(address: str, config_path: str, app_name: str) -> None:
    """Join the cluster, or start Ray here and deploy ``config_path`` when there is none to join."""
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )
    from ray.serve._private.constants import SERVE_NAMESPACE

    target = _resolve(address)
    if target is not None and not _reachable(target):
        if address != "auto":
            raise StartupError(f"no Ray cluster answers at {target} (RAY_ADDRESS={address})")
        log.warning("the last Ray cluster (%s) is gone; starting one here", target)
        target = None
    if target is None:
        deploy_from_config(config_path, app_name)
        return
    # Ray 2.60 uses an available token (~/.ray/auth_token or RAY_AUTH_TOKEN) only for a cluster it finds itself;
    # joining an explicit address without RAY_AUTH_MODE=token would be refused. Use the token when there is one.
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    try:
        # The cluster's owner has the replica logs; this process prints its own lines only.
        ray.init(address=target, namespace=SERVE_NAMESPACE, log_to_driver=False)
    except Exception as e:
        raise StartupError(f"cannot join the Ray cluster at {target}: {one_line(e)}; a process joining a cluster "
                           "needs its auth token (~/.ray/auth_token or RAY_AUTH_TOKEN; Ray 2.60 turns token "
                           "authentication on by default)") from None
    log.info("joined the Ray cluster at %s", target)


def load_config(path: str, app_name: str) -> Any:
    from ray.serve.schema import ServeDeploySchema

    if not os.path.isfile(path):
        raise StartupError(f"no Ray cluster to join and no Serve config at '{path}' (set RAY_ADDRESS to join a "
                           "cluster, or SERVE_CONFIG to the config file)")
    try:
        with open(path) as f:
            config = ServeDeploySchema.model_validate(yaml.safe_load(f))
    except ValidationError as e:
        err = e.errors()[0]
        raise StartupError(f"invalid Serve config '{path}': {'.'.join(str(x) for x in err['loc'])}: "
                           f"{err['msg']}") from None
    except (OSError, yaml.YAMLError) as e:
        flat = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())
        raise StartupError(f"cannot read the Serve config '{path}': {one_line(flat)}") from None
    if app_name not in [a.name for a in config.applications]:
        raise StartupError(f"the Serve config '{path}' has no application named '{app_name}'")
    return config


def deploy_from_config(path: str, app_name: str) -> None:
    """What ``serve run <config>`` does, with the Ray instance owned by this process."""
    from ray.serve._private.api import serve_start
    from ray.serve._private.constants import SERVE_NAMESPACE
    from ray.serve.config import gRPCOptions

    config = load_config(path, app_name)
    log.info("no Ray cluster to join: starting Ray here and deploying %s", path)
    ray.init(namespace=SERVE_NAMESPACE)
    client = serve_start(
        http_options=config.http_options.model_dump(),
        proxy_location=config.proxy_location,
        grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
        controller_options=config.controller_options,
    )
    client.deploy_apps(config, _blocking=False)


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


def wait_until_ready(app_name: str, timeout_s: float) -> tuple[DeploymentHandle, dict[str, Any]]:
    """Block (no event loop runs yet) until the ingress reports ``ready``; ``StartupError`` on failure."""
    deadline = time.monotonic() + timeout_s
    handle: DeploymentHandle | None = None
    last, next_log = "", 0.0
    while time.monotonic() < deadline:
        if time.monotonic() >= next_log and last:
            log.info("waiting for '%s': %s", app_name, last)
            next_log = time.monotonic() + 10
        try:
            app = serve.status().applications.get(app_name)
        except Exception as e:
            last = f"Serve is not reachable yet ({one_line(e)})"
            time.sleep(1)
            continue
        if app is None or app.status in ("NOT_STARTED", "DEPLOYING", "DELETING"):
            last = "application not deployed yet" if app is None else f"application {app.status.value}"
            time.sleep(0.5)
            continue
        if app.status == "DEPLOY_FAILED":
            raise StartupError(f"application '{app_name}' failed to deploy: {_deploy_failure(app.message)}")
        handle = handle or serve.get_app_handle(app_name)
        try:
            info: dict[str, Any] = handle.ready.remote().result(timeout_s=READY_CALL_TIMEOUT_S)
        except Exception as e:
            last = f"ready() failed: {as_serve_error(e).message}"
            time.sleep(1)
            continue
        state = info.get("state")
        if state == "ready":
            log.info("model %s ready (%s slots)", info.get("model"), info.get("slots_total"))
            return handle, info
        if state == "failed":
            msg = info.get("reason") or "no reason given"
            raise StartupError(f"model '{info.get('model')}' failed to load: {one_line(msg)}")
        last = f"model {info.get('model')} is {state}"
        time.sleep(0.5)
    raise StartupError(f"application '{app_name}' not ready after {timeout_s:.0f} s ({last})")


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise StartupError(f"{name} must be an integer, got '{raw}'") from None
    if value < 1:
        raise StartupError(f"{name} must be >= 1, got {value}")
    return value


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s runpod-worker: %(message)s")
    app_name = os.environ.get("SERVE_APP_NAME") or "llm"
    try:
        WORKER.cap = _env_int("RUNPOD_MAX_CONCURRENCY")
        timeout_s = float(_env_int("RUNPOD_READY_TIMEOUT_S") or 3600)
        connect(os.environ.get("RAY_ADDRESS") or "auto", os.environ.get("SERVE_CONFIG") or "serve_config.yaml",
                app_name)
        handle, info = wait_until_ready(app_name, timeout_s)
    except StartupError as e:
        print(f"runpod worker cannot start: {e}", file=sys.stderr, flush=True)
        return 1
    WORKER.attach(handle, info)

    import runpod  # only now: the SDK reads its env at import and must not take jobs before the model is ready

    runpod.serverless.start({
        "handler": handler,
        "return_aggregate_stream": True,
        "concurrency_modifier": concurrency_modifier,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
