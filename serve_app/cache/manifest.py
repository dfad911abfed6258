"""The manifest: what has been verified on this volume, readable by people and by a warm check.

``files`` holds one record per physical file, keyed ``<repo_id>@<commit>/<filename>`` (or the absolute path
of a local file); ``refs`` remembers what a reference (repo + filename or pattern + revision) resolved to, so a
warm start needs no network. Readers never lock (the file is replaced atomically); writers take
``.locks/manifest.lock`` around read-modify-write. ``mtime_ns == -1`` marks a record whose file failed a
re-hash: its warm checks re-hash again until the file is repaired.

The manifest lives on a shared volume, so it is untrusted input: the schema below refuses anything our own
writer would never produce (a ref without files, a commit that is not 40 hex digits, a Hub file whose path is
not the one its repo, commit and name imply, a key that disagrees with its record). A manifest that fails it,
or that is missing while published files exist, is moved aside as ``manifest.json.corrupt-<time>`` for
inspection, logged, and rebuilt by the ``recover`` callable (see ``recovery.py``), which adopts only files whose
bytes still match what was verified when they were published.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Literal

from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serve_app.cache.layout import Layout
from serve_app.cache.names import COMMIT_RE, validate_filename, validate_repo_id, validate_revision
from serve_app.errors import IntegrityError, ServeError, first_problem

log = logging.getLogger("serve_app.cache")

SUSPECT_MTIME = -1
_SHA256_CHARS = frozenset("0123456789abcdef")


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _name_rule(check: Callable[[str], str], value: str) -> str:
    """Run a naming rule inside a pydantic validator (our rules raise typed errors, pydantic wants ValueError)."""
    try:
        return check(value)
    except ServeError as exc:
        raise ValueError(exc.message) from None


def _commit(value: str) -> str:
    if not COMMIT_RE.fullmatch(value):
        raise ValueError(f"commit {value[:60]!r} is not 40 hex digits")
    return value


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileRecord(_Record):
    repo_id: str | None
    filename: str
    revision: str | None = Field(description="Revision requested when the file was fetched.")
    commit: str | None
    size: int = Field(ge=0)
    sha256: str = Field(min_length=64, max_length=64)
    verified_at: str
    path: str = Field(description="Relative to the cache dir for Hub files; absolute for local files.")
    mtime_ns: int = Field(ge=SUSPECT_MTIME)

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not set(v) <= _SHA256_CHARS:
            raise ValueError("sha256 is not lowercase hex")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> FileRecord:
        if self.repo_id is None:  # a local file the user named: its own absolute path, nothing to derive
            if not os.path.isabs(self.path) or self.filename != self.path or self.commit is not None:
                raise ValueError("a local record names its own absolute path and has no commit")
            return self
        _name_rule(validate_repo_id, self.repo_id)
        _name_rule(validate_filename, self.filename)
        _commit(self.commit or "")
        if self.revision is not None:
            _name_rule(validate_revision, self.revision)
        if self.path != Layout.relative_path(self.repo_id, self.commit or "", self.filename):
            raise ValueError(f"path {self.path[:200]!r} is not where {self.repo_id}@{self.commit} keeps it")
        return self

    def key(self) -> str:
        if self.repo_id is None:
            return self.path
        return Layout.file_key(self.repo_id, self.commit or "", self.filename)


class RefRecord(_Record):
    repo_id: str
    requested: str = Field(description="Filename or quant pattern as given.")
    revision: str
    commit: str
    files: list[str] = Field(min_length=1, description="Resolved filenames, first part first.")
    resolved_at: str

    @model_validator(mode="after")
    def _consistent(self) -> RefRecord:
        _name_rule(validate_repo_id, self.repo_id)
        _name_rule(validate_filename, self.requested)
        _name_rule(validate_revision, self.revision)
        _commit(self.commit)
        for name in self.files:
            _name_rule(lambda n: validate_filename(n, allow_glob=False), name)
        return self


class ManifestData(_Record):
    version: Literal[1] = 1
    files: dict[str, FileRecord] = Field(default_factory=dict)
    refs: dict[str, RefRecord] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _keys_match(self) -> ManifestData:
        for key, rec in self.files.items():
            if key != rec.key():
                raise ValueError(f"files key {key[:200]!r} does not match its record")
        for key, ref in self.refs.items():
            if key != ref_key(ref.repo_id, ref.requested, ref.revision):
                raise ValueError(f"refs key {key[:200]!r} does not match its record")
        return self


def ref_key(repo_id: str, requested: str, revision: str) -> str:
    return f"{repo_id}|{requested}|{revision}"


class _Damaged(Exception):
    """The manifest file exists but is not a manifest we would have written."""


class Manifest:
    def __init__(self, path: str, lock_path: str, *, lock_timeout_s: float = 120.0,
                 recover: Callable[[], ManifestData | None] | None = None) -> None:
        """``recover``: rebuild the records from the volume; None when there is nothing to rebuild from."""
        self.path = path
        self._lock_path = lock_path
        self._lock_timeout_s = lock_timeout_s
        self._recover = recover or (lambda: None)

    def read(self) -> ManifestData:
        """The current manifest, without locking: writers replace the file atomically."""
        try:
            data = self._load()
        except _Damaged as exc:
            data = None
            with self._locked():
                with contextlib.suppress(_Damaged):
                    data = self._load()  # another process may have repaired it meanwhile
                if data is None:
                    self._quarantine(str(exc))
        if data is not None:
            return data
        rebuilt = self._recover()  # hashing: outside the lock
        if rebuilt is None:
            return ManifestData()
        with self._update(recover=False) as current:
            _merge(current, rebuilt)
        return current

    def update(self) -> contextlib.AbstractContextManager[ManifestData]:
        """Read-modify-write under the manifest lock; the new file replaces the old one atomically."""
        return self._update(recover=True)

    @contextlib.contextmanager
    def _update(self, *, recover: bool) -> Iterator[ManifestData]:
        with self._locked():
            try:
                data = self._load()
            except _Damaged as exc:
                self._quarantine(str(exc))
                data = None
            if data is None:
                data = (self._recover() if recover else None) or ManifestData()
            yield data
            self._write(data)

    def _locked(self) -> FileLock:
        return FileLock(self._lock_path, timeout=self._lock_timeout_s)

    def _load(self) -> ManifestData | None:
        """The parsed manifest; None when there is none; ``_Damaged`` when it fails the schema."""
        try:
            # O_NOFOLLOW: a manifest planted as a symlink would make us parse a file outside the volume.
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise  # e.g. a permission problem: the manifest may be fine, so it is not moved aside
            raise _Damaged("it is a symlink") from exc
        with os.fdopen(fd, "rb") as f:
            raw = f.read()
        try:
            return ManifestData.model_validate_json(raw)
        except ValidationError as exc:
            where, problem = first_problem(exc)
            raise _Damaged(f"{where or 'document'}: {problem}"[:300]) from exc

    def _quarantine(self, reason: str) -> None:
        """Keep the damaged file for inspection (never silently overwrite it); the caller holds the lock."""
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = f"{self.path}.corrupt-{stamp}-{uuid.uuid4().hex[:6]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        log.warning("manifest %s is damaged (%s); moved it aside as %s and rebuilding it from the volume",
                    self.path, reason, os.path.basename(aside))

    def _write(self, data: ManifestData) -> None:
        try:  # never write what the next reader would quarantine (records are mutated in place, unvalidated)
            ManifestData.model_validate(data.model_dump())
        except ValidationError as exc:
            raise IntegrityError(f"Refusing to write an invalid manifest ({first_problem(exc)[1]})") from exc
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


def _merge(current: ManifestData, rebuilt: ManifestData) -> None:
    """Add what was rebuilt without overriding what another process recorded meanwhile."""
    for key, rec in rebuilt.files.items():
        current.files.setdefault(key, rec)
    for key, ref in rebuilt.refs.items():
        current.refs.setdefault(key, ref)


def fsync_dir(directory: str) -> None:
    """Make a rename durable (a crash right after ``os.replace`` must not resurrect the old entry)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network filesystems refuse fsync on directories
    finally:
        os.close(fd)
