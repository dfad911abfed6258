"""Where things live on the model volume, and the cross-process locks that guard them.

```
<cache_dir>/manifest.json                                 what is verified (see manifest.py)
<cache_dir>/models/<owner>--<name>/<commit>/<filename>    published files (split parts side by side)
<cache_dir>/.locks/<key-hash>.lock                        one flock per file (and manifest.lock)
<cache_dir>/.records/<key-hash>.json                      each published file's record (see recovery.py)
<cache_dir>/.staging/<key-hash>.<host>.<pid>.<rand>/      private download area of one attempt series
```

Several Ray replicas and RunPod workers (possibly on different hosts) share one volume. A staging directory
is only ever written while its file's lock is held, so any staging directory whose lock can be taken is an
orphan of a killed process and is removed; no pid or age heuristics, which would be wrong across hosts.
The kernel drops a flock when its holder dies, so a killed downloader never blocks the others.

Nothing outside the cache directory is ever read as a model or deleted: the fixed directories above must be real
directories (a symlinked ``.staging`` would turn the orphan sweep into a delete elsewhere), published paths are
checked by ``contained_path`` and deletes by ``deletable_path``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator

from filelock import FileLock, Timeout

from serve_app.cache.integrity import contained_path
from serve_app.errors import DownloadError, IntegrityError

log = logging.getLogger("serve_app.cache")

_WAIT_LOG_EVERY_S = 30.0


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class Layout:
    def __init__(self, cache_dir: str) -> None:
        os.makedirs(cache_dir, exist_ok=True)
        self.root = os.path.realpath(cache_dir)
        self.manifest_path = os.path.join(self.root, "manifest.json")
        self.locks_dir = os.path.join(self.root, ".locks")
        self.staging_root = os.path.join(self.root, ".staging")
        self.records_dir = os.path.join(self.root, ".records")
        for d in (self.locks_dir, self.staging_root, self.records_dir, os.path.join(self.root, "models")):
            os.makedirs(d, exist_ok=True)
            if os.path.realpath(d) != d:
                raise IntegrityError(f"Refusing the cache directory {self.root}: {os.path.basename(d)} is a symlink")

    # ---- paths -------------------------------------------------------------------------------------------------

    @staticmethod
    def file_key(repo_id: str, commit: str, filename: str) -> str:
        return f"{repo_id}@{commit}/{filename}"

    @staticmethod
    def relative_path(repo_id: str, commit: str, filename: str) -> str:
        owner, name = repo_id.split("/", 1)
        return f"models/{owner}--{name}/{commit}/{filename}"

    def final_path(self, repo_id: str, commit: str, filename: str) -> str:
        return contained_path(self.root, self.relative_path(repo_id, commit, filename))

    def display_path(self, stored_path: str) -> str:
        """Absolute form of a manifest path for reporting; unchecked, so only for already-verified records."""
        return stored_path if os.path.isabs(stored_path) else os.path.join(self.root, stored_path)

    def deletable_path(self, repo_id: str, commit: str, filename: str) -> str | None:
        """The published path to unlink, or None when deleting there could touch anything outside the volume.

        Unlike ``final_path`` the last component may be a symlink (``unlink`` removes the link itself), but no
        directory on the way may be one, and a name that climbs out is refused.
        """
        candidate = os.path.normpath(os.path.join(self.root, self.relative_path(repo_id, commit, filename)))
        models = os.path.join(self.root, "models")
        if os.path.commonpath([models, candidate]) != models or candidate == models:
            return None
        parent = os.path.dirname(candidate)
        return candidate if os.path.realpath(parent) == parent else None

    def record_path(self, key: str) -> str:
        return os.path.join(self.records_dir, f"{key_hash(key)}.json")

    def remove_empty_parents(self, path: str) -> None:
        models = os.path.join(self.root, "models")
        parent = os.path.dirname(path)
        while parent.startswith(models + os.sep):
            try:
                os.rmdir(parent)
            except OSError:
                return
            parent = os.path.dirname(parent)

    # ---- locks -------------------------------------------------------------------------------------------------

    def lock_path(self, key: str) -> str:
        return os.path.join(self.locks_dir, f"{key_hash(key)}.lock")

    @contextlib.contextmanager
    def locked(self, key: str, *, timeout_s: float, what: str) -> Iterator[None]:
        """Hold the lock of ``key``; while another process holds it, wait and say so in the log."""
        lock = FileLock(self.lock_path(key))
        deadline = time.monotonic() + timeout_s
        try:
            lock.acquire(blocking=False)
        except Timeout:
            log.info("waiting for another process that is fetching %s", what)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DownloadError(
                        f"Gave up after {timeout_s:.0f} s waiting for another process fetching {what}"
                    ) from None
                try:
                    lock.acquire(timeout=min(remaining, _WAIT_LOG_EVERY_S), poll_interval=0.05)
                    break
                except Timeout:
                    log.info("still waiting for another process that is fetching %s", what)
            log.info("lock for %s acquired", what)
        try:
            yield
        finally:
            lock.release()

    # ---- staging -----------------------------------------------------------------------------------------------

    def new_staging(self, key: str) -> str:
        name = f"{key_hash(key)}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        path = os.path.join(self.staging_root, name)
        os.makedirs(path)
        return path

    def sweep_staging(self, held_key: str | None = None) -> int:
        """Remove orphaned staging directories (their lock is free); returns how many.

        ``held_key``: the caller holds that key's lock, so its staging directories are orphans by definition.
        """
        held = key_hash(held_key) if held_key else None
        removed = 0
        try:
            entries = os.listdir(self.staging_root)
        except FileNotFoundError:
            return 0
        if not entries:
            return 0  # the common case, and the only cost on a warm path
        for entry in entries:
            path = os.path.join(self.staging_root, entry)
            owner = entry.split(".", 1)[0]
            if owner == held:
                removed += _rmtree(path)
                continue
            probe = FileLock(os.path.join(self.locks_dir, f"{owner}.lock"))
            try:
                probe.acquire(blocking=False)
            except Timeout:
                continue  # someone is downloading into it right now
            try:
                removed += _rmtree(path)
            finally:
                probe.release()
        if removed:
            log.info("removed %d orphaned staging director%s", removed, "y" if removed == 1 else "ies")
        return removed

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.staging_root).free


def _rmtree(path: str) -> int:
    if not os.path.lexists(path):
        return 0
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)
    return 1
