"""A Hugging Face Hub look-alike on 127.0.0.1 for tests: real HTTP, real client, no mocks.

Two stdlib HTTP/1.1 servers: "hub" (``/api/models/...`` and ``/{repo}/resolve/{rev}/{file}``) and "cdn"
(``/cdn/<sha256>`` with Range). The exchanges mirror what ``huggingface_hub`` 2.4 expects (see
``shared/reference/runpod_hf.md`` part B3): resolve answers 302 with ``X-Repo-Commit``, ``X-Linked-Etag``,
``X-Linked-Size`` and a cross-origin ``Location``; errors carry ``X-Error-Code``. Xet headers are never sent,
because a client that sees them abandons plain HTTP.

``add_file`` takes ``bytes`` (content) or a ``str``/``PathLike`` (a path, streamed from disk, never loaded
whole). ``set_fault`` kinds: ``status`` (``code=503``, any request), ``drop`` (``after_bytes``), ``stall``
(``seconds``, ``after_bytes``), ``corrupt`` (``offset``; same-size body) on CDN body GETs, and ``wrong_size``
(``delta=100``, ``where="resolve"|"api"|"cdn"``). ``path_contains`` also matches the file names of a CDN blob.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_BODY_FAULTS = ("drop", "stall", "corrupt")
_CHUNK = 256 * 1024
DEFAULT_TOKEN = "hf_fake_token_for_tests"


@dataclass
class _Blob:
    sha256: str
    size: int
    data: bytes | None = None
    path: str | None = None

    def chunks(self, start: int, end: int) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) pieces of [start, end); from disk without loading the file."""
        if self.data is not None:
            for off in range(start, end, _CHUNK):
                yield off, self.data[off : min(end, off + _CHUNK)]
            return
        assert self.path is not None
        with open(self.path, "rb") as f:
            f.seek(start)
            off = start
            while off < end:
                piece = f.read(min(_CHUNK, end - off))
                if not piece:
                    return
                yield off, piece
                off += len(piece)


@dataclass
class _Repo:
    gated: bool = False
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, str]] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


@dataclass
class _Fault:
    kind: str
    count: int
    path_contains: str | None
    kw: dict[str, Any]


def _blob_from(data: bytes | str | os.PathLike[str]) -> _Blob:
    if isinstance(data, bytes):
        return _Blob(hashlib.sha256(data).hexdigest(), len(data), data=data)
    path = os.fspath(data)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(4 * 1024 * 1024):
            h.update(piece)
    return _Blob(h.hexdigest(), os.path.getsize(path), path=path)


class FakeHub:
    """See the module docstring. Thread-safe; ``requests`` is a snapshot of the request log."""

    def __init__(self, *, token: str = DEFAULT_TOKEN, hub_port: int = 0) -> None:
        self.token = token
        self._hub_port = hub_port
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._repos: dict[str, _Repo] = {}
        self._blobs: dict[str, _Blob] = {}
        self._names: dict[str, set[str]] = {}
        self._faults: list[_Fault] = []
        self._log: list[dict[str, Any]] = []
        self._servers: dict[str, ThreadingHTTPServer] = {}
        self.endpoint = ""
        self.cdn_endpoint = ""

    # ---- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> FakeHub:
        for role, port in (("hub", self._hub_port), ("cdn", 0)):
            handler = type(f"_{role}Handler", (_Handler,), {"fake": self, "role": role})
            server = ThreadingHTTPServer(("127.0.0.1", port), handler)
            server.daemon_threads = True
            self._servers[role] = server
            threading.Thread(target=server.serve_forever, args=(0.05,), name=f"fake-{role}", daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self._servers['hub'].server_address[1]}"
        self.cdn_endpoint = f"http://127.0.0.1:{self._servers['cdn'].server_address[1]}"
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes stalled responses so their threads end
        for server in self._servers.values():
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- content -----------------------------------------------------------------------------------------------

    def add_file(self, repo_id: str, filename: str, data: bytes | str | os.PathLike[str], *, revision: str = "main",
                 commit: str | None = None, gated: bool = False) -> str:
        """Add ``filename`` at ``revision`` (or a new ``commit`` that the branch then points to); return sha256."""
        blob = _blob_from(data)
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo())
            repo.gated = repo.gated or gated
            target = self._target_commit(repo_id, repo, revision, commit)
            repo.commits[target][filename] = blob.sha256
            self._blobs[blob.sha256] = blob
            self._names.setdefault(blob.sha256, set()).add(filename)
        return blob.sha256

    def add_revision(self, repo_id: str, name: str, *, commit: str | None = None, source: str = "main") -> str:
        """Point branch/tag ``name`` at ``commit`` (new commits start as a copy of ``source``); return the commit."""
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo())
            base = repo.resolve(source)
            target = commit or base or _fake_commit(repo_id, name)
            if target not in repo.commits:
                repo.commits[target] = dict(repo.commits.get(base, {})) if base else {}
            repo.refs[name] = target
            return target

    add_tag = add_revision

    def commit_of(self, repo_id: str, revision: str = "main") -> str:
        with self._lock:
            commit = self._repos[repo_id].resolve(revision)
        if commit is None:
            raise KeyError(f"{repo_id}@{revision}")
        return commit

    def _target_commit(self, repo_id: str, repo: _Repo, revision: str, commit: str | None) -> str:
        if commit is not None:
            if commit not in repo.commits:
                base = repo.resolve(revision)
                repo.commits[commit] = dict(repo.commits[base]) if base else {}
            if not _COMMIT_RE.match(revision):
                repo.refs[revision] = commit
            return commit
        if _COMMIT_RE.match(revision):
            repo.commits.setdefault(revision, {})
            return revision
        if revision not in repo.refs:
            repo.refs[revision] = _fake_commit(repo_id, revision)
            repo.commits.setdefault(repo.refs[revision], {})
        return repo.refs[revision]

    # ---- faults and log ----------------------------------------------------------------------------------------

    def set_fault(self, kind: str, *, count: int = 1, path_contains: str | None = None, **kw: Any) -> None:
        if kind not in ("status", "wrong_size", *_BODY_FAULTS):
            raise ValueError(f"unknown fault kind {kind!r}")
        if kind == "wrong_size":
            kw.setdefault("where", "resolve")
        with self._lock:
            self._faults.append(_Fault(kind, count, path_contains, kw))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, kinds: tuple[str, ...], path: str, sha: str | None, **match: str) -> _Fault | None:
        """Consume one use of the first active fault of ``kinds`` that matches this request."""
        with self._lock:
            names = self._names.get(sha, set()) if sha else set()
            for fault in self._faults:
                if fault.kind not in kinds or fault.count == 0:
                    continue
                if fault.path_contains and not any(fault.path_contains in s for s in (path, *names)):
                    continue
                if any(fault.kw.get(k, v) != v for k, v in match.items()):
                    continue
                if fault.count > 0:
                    fault.count -= 1
                return fault
        return None

    @property
    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._log]

    def reset_log(self) -> None:
        with self._lock:
            self._log.clear()

    def body_downloads(self, sha256: str | None = None) -> int:
        """CDN GETs that started sending a body (of ``sha256`` if given)."""
        with self._lock:
            return sum(1 for r in self._log if r["host"] == "cdn" and r["method"] == "GET"
                       and r["status"] in (200, 206) and sha256 in (None, r["sha256"]))

    def _record(self, h: _Handler, method: str, status: int, sha: str | None = None) -> None:
        entry = {"method": method, "path": h.path, "host": h.role, "status": status, "sha256": sha,
                 "auth": "authorization" in {k.lower() for k in h.headers},
                 "headers": {k.lower(): v for k, v in h.headers.items() if k.lower() in ("range", "accept-encoding")}}
        with self._lock:
            self._log.append(entry)

    # ---- routing -----------------------------------------------------------------------------------------------

    def _handle(self, h: _Handler, method: str) -> None:
        path = urlsplit(h.path).path
        sha = path.rsplit("/", 1)[-1] if h.role == "cdn" else None
        fault = self._take_fault(("status",), path, sha, method=method, host=h.role)
        if fault is not None:
            code = int(fault.kw.get("code", 503))
            self._record(h, method, code, sha)
            return h.reply(method, code, {"X-Error-Message": "injected fault"}, b'{"error":"injected"}')
        if h.role == "cdn":
            return self._cdn(h, method, path)
        parts = [unquote(p) for p in path.split("/")[1:]]
        if parts[:2] == ["api", "models"] and len(parts) in (4, 6) and method == "GET":
            return self._api(h, "/".join(parts[2:4]), parts[5] if len(parts) == 6 else "main")
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(h, method, "/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        self._record(h, method, 404)
        h.reply(method, 404, {}, b"not found")

    def _hub_error(self, h: _Handler, method: str, status: int, code: str, **extra: str) -> None:
        self._record(h, method, status)
        headers = {"X-Error-Code": code, "X-Error-Message": code, **extra}
        h.reply(method, status, headers, json.dumps({"error": code}).encode())

    def _lookup(self, repo_id: str, revision: str) -> tuple[_Repo | None, str | None]:
        with self._lock:
            repo = self._repos.get(repo_id)
            return repo, (repo.resolve(revision) if repo else None)

    def _api(self, h: _Handler, repo_id: str, revision: str) -> None:
        repo, commit = self._lookup(repo_id, revision)
        if repo is None:
            return self._hub_error(h, "GET", 401, "RepoNotFound")
        if commit is None:
            return self._hub_error(h, "GET", 404, "RevisionNotFound")
        delta = self._size_delta(h.path, None, "api")
        with self._lock:
            files = sorted(repo.commits[commit].items())
            siblings = [{"rfilename": name, "size": self._blobs[sha].size + delta,
                         "blobId": hashlib.sha1(sha.encode()).hexdigest(),
                         "lfs": {"sha256": sha, "size": self._blobs[sha].size + delta, "pointerSize": 134}}
                        for name, sha in files]
        body = {"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                "gated": "manual" if repo.gated else False, "disabled": False, "tags": ["gguf"], "siblings": siblings}
        self._record(h, "GET", 200)
        h.reply("GET", 200, {"Content-Type": "application/json"}, json.dumps(body).encode())

    def _size_delta(self, path: str, sha: str | None, where: str) -> int:
        fault = self._take_fault(("wrong_size",), path, sha, where=where)
        if fault is None:
            return 0
        return int(fault.kw.get("delta", 100))

    def _authorized(self, h: _Handler) -> bool:
        return h.headers.get("Authorization", "") == f"Bearer {self.token}"

    def _resolve(self, h: _Handler, method: str, repo_id: str, revision: str, filename: str) -> None:
        repo, commit = self._lookup(repo_id, revision)
        if repo is None:
            return self._hub_error(h, method, 401, "RepoNotFound")
        if repo.gated and not self._authorized(h):
            return self._hub_error(h, method, 403, "GatedRepo")
        if commit is None:
            return self._hub_error(h, method, 404, "RevisionNotFound")
        with self._lock:
            sha = repo.commits[commit].get(filename)
            size = self._blobs[sha].size if sha else 0
        if sha is None:
            return self._hub_error(h, method, 404, "EntryNotFound", **{"X-Repo-Commit": commit})
        size += self._size_delta(h.path, sha, "resolve")
        headers = {"X-Repo-Commit": commit, "X-Linked-Etag": f'"{sha}"', "ETag": f'"{sha}"',
                   "X-Linked-Size": str(size), "Location": f"{self.cdn_endpoint}/cdn/{sha}"}
        self._record(h, method, 302)
        h.reply(method, 302, headers, b"")

    def _cdn(self, h: _Handler, method: str, path: str) -> None:
        sha = path.rsplit("/", 1)[-1]
        with self._lock:
            blob = self._blobs.get(sha) if path.startswith("/cdn/") else None
        if blob is None:
            self._record(h, method, 404, sha)
            return h.reply(method, 404, {}, b"no such blob")
        span = _parse_range(h.headers.get("Range"), blob.size)
        if span is None:
            self._record(h, method, 416, sha)
            return h.reply(method, 416, {"Content-Range": f"bytes */{blob.size}"}, b"")
        start, end, partial = span
        length = end - start + self._size_delta(path, sha, "cdn")
        headers = {"Content-Length": str(length), "Accept-Ranges": "bytes", "ETag": f'"{sha}"',
                   "Content-Type": "application/octet-stream"}
        if partial:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
        status = 206 if partial else 200
        fault = self._take_fault(_BODY_FAULTS, path, sha) if method == "GET" else None
        self._record(h, method, status, sha)
        h.start(status, headers)
        if method == "GET":
            self._send_body(h, blob, start, end, fault)
        if length != end - start:
            h.close_connection = True

    def _send_body(self, h: _Handler, blob: _Blob, start: int, end: int, fault: _Fault | None) -> None:
        kw = fault.kw if fault else {}
        cut = start + int(kw.get("after_bytes", (end - start) // 2))
        flip = int(kw.get("offset", blob.size // 2))
        for off, piece in blob.chunks(start, end):
            if fault and fault.kind in ("drop", "stall") and off <= cut < off + len(piece):
                h.wfile.write(piece[: cut - off])
                h.wfile.flush()
                if fault.kind == "drop":
                    h.close_connection = True
                    return
                self._stop.wait(float(kw.get("seconds", 5.0)))
                piece, off = piece[cut - off :], cut
            if fault and fault.kind == "corrupt" and off <= flip < off + len(piece):
                buf = bytearray(piece)
                buf[flip - off] ^= 0xFF
                piece = bytes(buf)
            h.wfile.write(piece)
        h.wfile.flush()


def _fake_commit(repo_id: str, revision: str) -> str:
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


def _parse_range(header: str | None, size: int) -> tuple[int, int, bool] | None:
    """(start, end_exclusive, is_partial), or None when unsatisfiable."""
    if not header:
        return 0, size, False
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return 0, size, False
    if not m.group(1):
        start = max(0, size - int(m.group(2)))
        return start, size, True
    start = int(m.group(1))
    end = min(size, int(m.group(2)) + 1) if m.group(2) else size
    if start >= size or start >= end:
        return None
    return start, end, True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"
    fake: FakeHub
    role: str

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def _dispatch(self, method: str) -> None:
        try:
            self.fake._handle(self, method)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True

    def start(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def reply(self, method: str, status: int, headers: dict[str, str], body: bytes) -> None:
        self.start(status, {**headers, "Content-Length": str(len(body))})
        if method != "HEAD" and body:
            self.wfile.write(body)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.fake_hub", description="Serve files like the Hub.")
    parser.add_argument("--serve-file", nargs=3, action="append", default=[], metavar=("REPO", "FILE", "PATH"))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    args = parser.parse_args(argv)
    hub = FakeHub(token=args.token, hub_port=args.port).start()
    for repo_id, filename, path in args.serve_file:
        hub.add_file(repo_id, filename, path)
    print(hub.endpoint, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    hub.stop()


if __name__ == "__main__":
    main()
