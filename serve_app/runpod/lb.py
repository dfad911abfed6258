"""The worker as a RunPod load-balancing endpoint (``python -m serve_app.runpod`` with ``PORT``/``PORT_HEALTH``
set, or ``GGUF_SERVE_RUNPOD_MODE=lb``): RunPod sends HTTP straight to the container, so Ray Serve's own HTTP
proxy serves the OpenAI API on ``$PORT`` (streaming included) and no job handler runs.

* When this process starts Ray, the Serve config's ``http_options.port`` becomes ``$PORT`` (bootstrap).
* ``/ping`` answers on ``$PORT_HEALTH``: 200 ready, 204 while loading, 503 failed (``ingress/ping.py``). When
  ``PORT_HEALTH`` is ``PORT`` (RunPod's own examples set both alike) the Ingress answers it; otherwise a small
  listener in this process does, from the first second on (Ray and the model load behind it), following
  ``Ingress.ready()`` once a second.
* The process stays up while Ray runs in it: a model that fails to load keeps answering 503 (RunPod then replaces
  the worker) instead of exiting into a restart loop.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from serve_app.ingress.ping import ping_status

log = logging.getLogger("serve_app.runpod")

POLL_S = 1.0


class Health:
    """The ``/ready`` status the health listener reports, set by the main thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._body: dict[str, Any] = {"status": "loading"}

    def set(self, body: dict[str, Any]) -> None:
        with self._lock:
            if body.get("status") != self._body.get("status"):
                log.info("/ping: %s (%d)", body.get("status"), ping_status(str(body.get("status"))))
            self._body = dict(body)

    def get(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._body)


def serve_health(health: Health, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """``GET /ping`` on ``host:port`` in a daemon thread; every other path is a 404."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # RunPod probes often; state changes are logged by Health

        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/ping":
                self._send(404, {"error": {"message": f"no route GET {self.path[:100]}", "type":
                                           "invalid_request_error", "param": None, "code": "not_found"}})
                return
            body = health.get()
            self._send(ping_status(str(body.get("status"))), body)

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = b"" if status == 204 else json.dumps(body).encode()
            self.send_response(status)
            if data:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="ping", daemon=True).start()
    log.info("/ping answers on %s:%d", host, port)
    return server


def ready_body(info: dict[str, Any]) -> dict[str, Any]:
    """``Ingress.ready()`` as ``/ready``'s body (the state, the model, and a failure's short reason)."""
    body = {"status": info.get("state", "unavailable"), "model": info.get("model")}
    if info.get("state") == "failed":
        body["reason"] = info.get("reason")
    return body


def follow(handle: Any, health: Health, stop: threading.Event, call_timeout_s: float) -> None:
    """Keep ``health`` on the ingress's state until ``stop`` is set (a replica restarting reads as 204)."""
    while not stop.wait(POLL_S):
        try:
            info = handle.ready.remote().result(timeout_s=call_timeout_s)
        except Exception as e:
            health.set({"status": "unavailable", "reason": type(e).__name__})
            continue
        health.set(ready_body(info))
