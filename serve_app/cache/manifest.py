"""The manifest: what has been verified on this volume, readable by people and by a warm check.

``files`` holds one record per physical file, keyed ``<repo_id>@<commit>/<filename>`` (or the absolute path
of a local file); ``refs`` remembers what a reference (repo + filename or pattern + revision) resolved to, so a
warm start needs no network. Readers never lock (the file is replaced atomically); writers take
``.locks/manifest.lock`` around read-modify-write. ``mtime_ns == -1`` marks a record whose file failed a
re-hash: its warm checks re-hash again until the file is repaired.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import uuid
from collections.abc import Iterator

from filelock import FileLock
from pydantic import BaseModel, Field, ValidationError

log = logging.getLogger("serve_app.cache")

SUSPECT_MTIME = -1


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class FileRecord(BaseModel):
    repo_id: str | None
    filename: str
    revision: str | None = Field(description="Revision requested when the file was fetched.")
    commit: str | None
    size: int
    sha256: str
    verified_at: str
    path: str = Field(description="Relative to the cache dir for Hub files; absolute for local files.")
    mtime_ns: int


class RefRecord(BaseModel):
    repo_id: str
    requested: str = Field(description="Filename or quant pattern as given.")
    revision: str
    commit: str
    files: list[str] = Field(description="Resolved filenames, first part first.")
    resolved_at: str


class ManifestData(BaseModel):
    version: int = 1
    files: dict[str, FileRecord] = Field(default_factory=dict)
    refs: dict[str, RefRecord] = Field(default_factory=dict)


def ref_key(repo_id: str, requested: str, revision: str) -> str:
    return f"{repo_id}|{requested}|{revision}"


class Manifest:
    def __init__(self, path: str, lock_path: str, *, lock_timeout_s: float = 120.0) -> None:
        self.path = path
        self._lock_path = lock_path
        self._lock_timeout_s = lock_timeout_s

    def read(self) -> ManifestData:
        """The current manifest, without locking: writers replace the file atomically."""
        return self._parse()

    def _parse(self) -> ManifestData:
        try:
            with open(self.path, encoding="utf-8") as f:
                return ManifestData.model_validate(json.load(f))
        except FileNotFoundError:
            return ManifestData()
        except (ValueError, ValidationError) as exc:
            # Losing the index only costs re-verification: files on disk are re-adopted by hash on the next pull.
            log.warning("manifest %s is unreadable (%s); starting a new one", self.path, type(exc).__name__)
            return ManifestData()

    @contextlib.contextmanager
    def update(self) -> Iterator[ManifestData]:
        """Read-modify-write under the manifest lock; the new file replaces the old one atomically."""
        with FileLock(self._lock_path, timeout=self._lock_timeout_s):
            data = self._parse()
            yield data
            self._write(data)

    def _write(self, data: ManifestData) -> None:
        directory = os.path.dirname(self.path)
        tmp = os.path.join(directory, f".manifest.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(data.model_dump_json(indent=2))
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    """Make a rename durable (a crash right after ``os.replace`` must not resurrect the old entry)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network filesystems refuse fsync on directories
    finally:
        os.close(fd)
