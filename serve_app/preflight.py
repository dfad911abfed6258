"""``python -m serve_app.preflight serve_config.yaml``: validate the config and warm the model cache before
``serve run``.

``serve run`` deploys asynchronously and then sleeps forever, so a model that cannot be fetched would only show
up as a failed replica in the logs. Running this first fails fast, with one readable line (e.g. the Hub is
unreachable and how to use a mirror), and leaves a verified file on the volume so the replicas start warm (the
seed's cache-warming step).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml
from pydantic import ValidationError

from serve_app.cache.store import ModelStore
from serve_app.config import AppArgs
from serve_app.errors import ServeError, first_problem


def app_args(config_path: str, app_name: str = "llm") -> AppArgs:
    with open(config_path, encoding="utf-8") as f:
        doc: dict[str, Any] = yaml.safe_load(f) or {}
    for app in doc.get("applications") or []:
        if app.get("name") == app_name:
            return AppArgs.model_validate(app.get("args") or {})
    raise ValueError(f"{config_path} has no application named '{app_name}'")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve_app.preflight", description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="serve_config.yaml")
    ap.add_argument("--app", default="llm")
    a = ap.parse_args(argv)
    try:
        args = app_args(a.config, a.app)
        store = ModelStore(args.cache_dir, args.download)
        cached = [store.ensure(entry.ref()) for entry in args.served()]  # every model of the app
    except ValidationError as e:
        where, problem = first_problem(e)
        print(f"error: {a.config}: args{'.' + where if where else ''}: {problem}", file=sys.stderr)
        return 2
    except (OSError, ValueError, yaml.YAMLError) as e:
        print(f"error: {a.config}: {e}", file=sys.stderr)
        return 2
    except ServeError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    for c in cached:
        print(f"model ready on the volume: {c.path} ({c.size} bytes, sha256 {c.sha256[:12]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
