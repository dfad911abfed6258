"""``python -m serve_app.cache``: pull, adopt, status, verify, list and rm models on a cache volume.

``pull --config serve_config.yaml [--app llm]`` warms every model the app serves (``model`` or ``models``).

Contract: with ``--json`` the last stdout line is one JSON object (``state``, ``path``, ``size``, ``sha256``,
``revision``, ``commit``, ...; ``{"files": [...]}`` for ``list``; ``{"error": {...}}`` on failure). Exit codes:
0 success / present, 1 error, 2 usage, 3 corrupt, 4 missing, 130 interrupted. A failure prints exactly one
readable ``error: ...`` line on stderr and never a traceback (``-v`` adds progress, retry and lock-wait lines
before it). ``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` apply. Use ``-`` as REPO_ID for a local path.

``adopt`` takes a model from a Hugging Face cache directory (``--from``, repeatable; default: the
``GGUF_SERVE_HF_CACHE_DIRS`` directories, then ``$HF_HUB_CACHE``) into the volume after verifying it
(``serve_app/cache/adopt.py``); it never downloads: 4 when no cache holds the file, 3 when it fails verification.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

import yaml
from pydantic import ValidationError

from serve_app.cache.results import cached_from_records
from serve_app.cache.store import CachedFile, CacheStatus, ModelStore
from serve_app.config import AppArgs, DownloadConfig, ModelRef
from serve_app.errors import ServeError, first_problem
from serve_app.settings import Settings

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CORRUPT, EXIT_MISSING = 0, 1, 2, 3, 4
_STATE_EXIT = {"present": EXIT_OK, "corrupt": EXIT_CORRUPT, "missing": EXIT_MISSING}


class UsageError(Exception):
    """An argument argparse cannot check (a directory that is not one, a config file that cannot be read); exit 2
    with one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serve_app.cache", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="progress and retry details on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "pull": "download (if needed) and verify a model file",
        "adopt": "verify a model in a Hugging Face cache directory and add it to the volume (no download)",
        "status": "present / missing / corrupt, without re-hashing unless size or mtime changed",
        "verify": "re-hash the cached file(s) against the recorded sha256",
        "rm": "delete a cached model and its manifest entries",
    }
    for name, text in helps.items():
        cmd = sub.add_parser(name, help=text, description=text)
        optional = "?" if name == "pull" else None  # pull --config names its models in the file
        cmd.add_argument("repo_id", metavar="REPO_ID", nargs=optional,
                         help="owner/name on the Hub, or '-' for a local path")
        cmd.add_argument("filename", metavar="FILENAME", nargs=optional,
                         help="file, quant pattern ('*Q4_K_M.gguf') or local path")
        cmd.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
        _common(cmd, cache_dir_required=name != "pull")
        if name == "pull":
            cmd.add_argument("--config", help="a Serve config: pull every model of its app (see --app)")
            cmd.add_argument("--app", default="llm", help="the application in --config (default: llm)")
            cmd.add_argument("--refresh", action="store_true", help="re-resolve the revision on the Hub")
            cmd.add_argument("--progress", choices=("auto", "bar", "log", "none"), default="auto")
            cmd.add_argument("--max-attempts", type=int, default=None)
            cmd.add_argument("--timeout", type=float, default=None, help="overall deadline per file, seconds")
            cmd.add_argument("--read-timeout", type=float, default=None, help="socket read timeout, seconds")
        if name == "adopt":
            cmd.add_argument("--from", dest="sources", action="append", metavar="DIR",
                             help="a Hugging Face hub cache directory (repeatable)")
            cmd.add_argument("--mode", choices=("auto", "link", "copy"), default="auto",
                             help="auto: hard link when possible, else copy")
    _common(sub.add_parser("list", help="list cached models", description="list cached models"))
    return parser


def _common(cmd: argparse.ArgumentParser, cache_dir_required: bool = True) -> None:
    cmd.add_argument("--cache-dir", required=cache_dir_required,
                     help="the model volume" + ("" if cache_dir_required else " (default with --config: its cache_dir)"))
    cmd.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")


def _download_config(args: argparse.Namespace) -> DownloadConfig:
    overrides = {
        "max_attempts": getattr(args, "max_attempts", None),
        "timeout_s": getattr(args, "timeout", None),
        "read_timeout_s": getattr(args, "read_timeout", None),
    }
    return DownloadConfig(**{k: v for k, v in overrides.items() if v is not None})


def _ref(args: argparse.Namespace) -> ModelRef:
    repo_id = None if args.repo_id == "-" else args.repo_id
    return ModelRef(repo_id=repo_id, filename=args.filename, revision=args.revision)


def _as_status(cached: CachedFile) -> dict[str, Any]:
    return {"state": "present", **cached.model_dump()}


def _human(info: dict[str, Any]) -> str:
    state = info.get("state", "present")
    where = info.get("path") or f"{info.get('repo_id')}/{info.get('filename')}"
    extra = f"  {info['size']} bytes  sha256 {info['sha256']}" if info.get("sha256") else ""
    if info.get("adoptable_from"):
        extra += f"  (in the Hugging Face cache {info['adoptable_from']}: the next pull adopts it)"
    return f"{state:8} {where}{extra}"


def run(args: argparse.Namespace) -> int:
    if args.command == "pull" and (args.config is None) == (args.repo_id is None or args.filename is None):
        raise UsageError("pull takes REPO_ID FILENAME, or --config FILE (not both)")
    if args.command == "pull" and args.config is not None:
        return pull_config(args)
    if args.cache_dir is None:
        raise UsageError("--cache-dir is required")
    store = ModelStore(args.cache_dir, _download_config(args), progress=getattr(args, "progress", "auto"))
    if args.command == "list":
        files = [f.model_dump() for f in store.list()]
        for f in files:
            print(_human({"state": "present", **f}))
        if args.json:
            print(json.dumps({"files": files}))
        return EXIT_OK
    ref = _ref(args)
    if args.command == "adopt":
        return _adopt(store, ref, args)
    if args.command == "rm":
        store.invalidate(ref)
        info: dict[str, Any] = {"state": "missing", "repo_id": ref.repo_id, "filename": ref.filename,
                                "revision": ref.revision, "path": None, "size": None, "sha256": None}
    elif args.command == "pull":
        info = _as_status(store.ensure(ref, refresh=args.refresh))
    else:
        result: CacheStatus = store.verify(ref) if args.command == "verify" else store.status(ref)
        info = result.model_dump()
    print(_human(info) if args.command != "rm" else f"removed  {ref.repo_id or ''} {ref.filename}")
    if args.json:
        print(json.dumps(info))
    return EXIT_OK if args.command == "rm" else _STATE_EXIT[info["state"]]


def _adopt(store: ModelStore, ref: ModelRef, args: argparse.Namespace) -> int:
    if ref.is_local:
        raise UsageError("adopt takes a Hub repo id, not '-'")
    sources = args.sources or [*Settings().hf_cache_dirs, _hf_hub_cache()]
    bad = [d for d in (args.sources or []) if not os.path.isdir(d)]
    if bad:
        raise UsageError(f"--from {bad[0]}: not a directory")
    adopted = store.adopt(ref, sources, args.mode)
    info: dict[str, Any] = {"state": adopted.state, "repo_id": ref.repo_id, "filename": ref.filename,
                            "revision": ref.revision, "commit": adopted.commit}
    if adopted.state == "present":
        info.update(cached_from_records(store.layout, ref.revision, adopted.records).model_dump())
    info.update(source=adopted.source, verified_against=adopted.verified_against)
    print(_human(info))
    if args.json:
        print(json.dumps(info))
    return _STATE_EXIT[adopted.state]


def _hf_hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def config_app_args(path: str, app_name: str) -> AppArgs:
    """The ``args`` of application ``app_name`` in a Serve config, validated."""
    try:
        with open(path, encoding="utf-8") as f:
            doc: dict[str, Any] = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    for app in doc.get("applications") or []:
        if app.get("name") == app_name:
            return AppArgs.model_validate(app.get("args") or {})
    raise UsageError(f"{path} has no application named '{app_name}'")


def pull_config(args: argparse.Namespace) -> int:
    """Warm the volume with every model of a config's app, one after another (each verified once)."""
    app = config_app_args(args.config, args.app)
    download = app.download.model_copy(update=_download_config(args).model_dump(exclude_unset=True))
    store = ModelStore(args.cache_dir or app.cache_dir, download, progress=args.progress)
    infos = []
    for entry in app.served():
        info = _as_status(store.ensure(entry.ref(), refresh=args.refresh))
        infos.append({"name": app.entry_name(entry), **info})
        print(f"{_human(info)}  ({app.entry_name(entry)})")
    if args.json:
        print(json.dumps({"files": infos}))
    return EXIT_OK


def _configure_logging(verbose: bool) -> None:
    # Quiet by default so that a failure leaves exactly one line on stderr; -v shows progress, retries, waits.
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one INFO line per request otherwise
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def _fail(message: str, as_json: bool, body: dict[str, Any] | None = None) -> None:
    if as_json:
        print(json.dumps({"error": body or {"message": message, "code": "internal_error"}}))
    print(f"error: {' '.join(message.split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return run(args)
    except ServeError as err:
        _fail(f"{err.code}: {err.message}", args.json, err.to_dict())
        return EXIT_ERROR
    except KeyboardInterrupt:
        _fail("interrupted", args.json)
        return 130
    except UsageError as err:  # a usage mistake, or a config file that cannot be read
        _fail(str(err), args.json)
        return EXIT_USAGE
    except ValidationError as err:  # the reference or the download options
        where, problem = first_problem(err)
        _fail(f"invalid {where or 'argument'}: {problem}", args.json)
        return EXIT_USAGE
    except Exception as err:
        logging.getLogger("serve_app.cache").debug("unexpected error", exc_info=True)
        _fail(f"internal error: {type(err).__name__}: {err}", args.json)
        return EXIT_ERROR
