"""``python -m serve_app.drain [--app llm] [--timeout 30]``: stop an application gracefully.

New requests get 503 (with Retry-After) and ``/ready`` turns 503 while in-flight generations finish; then the app
is deleted. Ray Serve alone would drain in-flight requests too, but answers new ones with a plain-text 404 once the
route is gone. Use it as a pre-stop hook (Kubernetes, RunPod) on the node that runs the app.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve_app.drain", description=__doc__.splitlines()[0])
    ap.add_argument("--app", default="llm")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for in-flight generations")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else auto)")
    a = ap.parse_args(argv)
    import ray
    from ray import serve

    from serve_app.settings import Settings

    try:
        ray.init(address=a.address or Settings().address(), log_to_driver=False, configure_logging=False)
        result = serve.get_app_handle(a.app).drain.remote(a.timeout).result(timeout_s=a.timeout + 30)
        serve.delete(a.app)
    except Exception as e:  # one readable line for operators, no traceback
        print(f"error: could not drain '{a.app}': {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"app": a.app, **result, "deleted": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
