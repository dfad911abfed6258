"""``python -m serve_app.drain [--app llm] [--timeout 30]``: stop an application gracefully.

Every Ingress replica answers new requests with 503 (with Retry-After) and ``/ready`` with 503 while the in-flight
generations of every LlamaModel replica finish; then the app is deleted. Ray Serve alone would drain in-flight requests too, but answers new ones with a plain-text 404 once the
route is gone. Use it as a pre-stop hook (Kubernetes, RunPod) on the node that runs the app.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve_app.drain", description=__doc__.splitlines()[0])
    ap.add_argument("--app", default="llm")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for in-flight generations")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else auto)")
    a = ap.parse_args(argv)
    import ray
    from ray import serve

    from serve_app import ray_private
    from serve_app.settings import Settings

    try:
        ray_private.enable_token_auth_if_available()  # Ray uses a token by itself only for a cluster it finds
        ray.init(address=a.address or Settings().address(), log_to_driver=False, configure_logging=False)
        handle = serve.get_app_handle(a.app)
        result = asyncio.run(drain_every_ingress(a.app, handle.deployment_name, a.timeout))
        if result is None:  # Serve's controller could not list the replicas: the one a handle call reaches
            result = handle.drain.remote(a.timeout).result(timeout_s=a.timeout + 30)
        serve.delete(a.app)
    except Exception as e:  # one readable line for operators, no traceback
        print(f"error: could not drain '{a.app}': {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"app": a.app, **result, "deleted": True}))
    return 0


async def drain_every_ingress(app: str, ingress: str, timeout_s: float) -> dict[str, Any] | None:
    """``Ingress.drain`` on every Ingress replica at once (each refuses new requests, then waits for every
    LlamaModel replica to be idle); None when the replicas cannot be listed."""
    from serve_app.replicas import Replicas

    try:
        results = await Replicas(app, ingress).call("drain", timeout_s, timeout_s=timeout_s + 30)
    except Exception:
        return None
    if not results:
        return None
    done = [r for r in results.values() if isinstance(r, dict)]
    return {"drained": len(done) == len(results) and all(r["drained"] for r in done),
            "slots_busy": max((r["slots_busy"] for r in done), default=0),
            "waiting": max((r["waiting"] for r in done), default=0),
            "ingress_replicas": len(results),
            "model_replicas": max((r.get("model_replicas", 0) for r in done), default=0)}


if __name__ == "__main__":
    sys.exit(main())
