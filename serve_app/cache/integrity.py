"""Content hashing and path containment for the model volume.

``hash_file`` reads a few MiB at a time into one reused buffer with sequential read-ahead advice; sha256 (SHA-NI)
is the bottleneck, so this matches plain ``hashlib`` (a read-ahead thread measured slower: see bench_cache.py).
Paths inside the volume are never followed through symlinks: a planted link could point a reader (or our
deletes) at anything on the machine.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from serve_app.errors import IntegrityError

CHUNK_SIZE = 4 * 1024 * 1024


class StreamHasher:
    """sha256 of a byte stream, plus the git blob sha1 when the Hub only gives that (non-LFS files)."""

    def __init__(self, git_size: int | None = None) -> None:
        self._sha256 = hashlib.sha256()
        self._sha1 = hashlib.sha1(b"blob %d\0" % git_size, usedforsecurity=False) if git_size is not None else None

    def update(self, data: bytes | memoryview) -> None:
        self._sha256.update(data)
        if self._sha1 is not None:
            self._sha1.update(data)

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()

    @property
    def git_sha1(self) -> str | None:
        return self._sha1.hexdigest() if self._sha1 is not None else None


@dataclass(frozen=True)
class FileDigest:
    size: int
    sha256: str
    mtime_ns: int
    git_sha1: str | None = None


def hash_file(
    path: str, *, follow_symlinks: bool = False, git: bool = False, chunk_size: int = CHUNK_SIZE
) -> FileDigest:
    """Hash a regular file; refuses a symlink unless ``follow_symlinks`` (local paths given by the user)."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | (0 if follow_symlinks else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if os.path.islink(path):
            raise IntegrityError(f"Refusing to read {path!r}: it is a symlink") from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"Refusing to read {path!r}: not a regular file")
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        hasher = StreamHasher(st.st_size if git else None)
        size = 0
        for block in _blocks(fd, chunk_size):
            hasher.update(block)
            size += len(block)
        return FileDigest(size, hasher.sha256, st.st_mtime_ns, hasher.git_sha1)
    finally:
        os.close(fd)


def _blocks(fd: int, chunk_size: int) -> Iterator[memoryview]:
    """Chunks of ``fd`` read into one reused buffer (no per-chunk allocation)."""
    buf = bytearray(chunk_size)
    with memoryview(buf) as view:
        while n := os.readv(fd, [buf]):
            yield view[:n]


def hashlib_baseline(path: str) -> str:
    """Plain ``hashlib.file_digest``: the reference the benchmark compares ``hash_file`` against."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---- containment ---------------------------------------------------------------------------------------------


def contained_path(root: str, relative: str) -> str:
    """``root/relative`` after checking that it stays inside ``root`` without passing through a symlink.

    ``root`` must already be a real path. A path that does not exist yet is fine; an existing component that
    is a symlink (or a ``..`` that escapes) is refused.
    """
    candidate = os.path.normpath(os.path.join(root, relative))
    if os.path.commonpath([root, candidate]) != root or candidate == root:
        raise IntegrityError(f"Refusing path {relative!r}: it escapes the cache directory")
    if os.path.realpath(candidate) != candidate:
        raise IntegrityError(f"Refusing path {relative!r}: it passes through a symlink inside the cache directory")
    return candidate


def regular_file_stat(path: str) -> os.stat_result | None:
    """lstat of a published file: None when absent; refuses symlinks and non-files."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise IntegrityError(f"Refusing cached path {path!r}: it is {kind}")
    return st
