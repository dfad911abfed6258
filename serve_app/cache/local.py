"""Local model paths (``repo_id`` is None): no Hub, no copy; the file itself is the source of truth.

The manifest keeps a record per absolute path so a warm check is a stat, and the sha256 is computed once
(and again whenever size or mtime change). A changed local file is not "corrupt": nothing says what it should
contain, so it is simply re-hashed and re-recorded. Symlinks are followed here, because the user named the
path deliberately; inside the volume they never are.
"""

from __future__ import annotations

import os

from serve_app.cache.integrity import hash_file
from serve_app.cache.manifest import FileRecord, Manifest, utc_now
from serve_app.cache.names import glob_candidates, is_glob, names_hint, split_part_names
from serve_app.errors import InvalidModelReferenceError, LocalFileNotFoundError


def local_parts(filename: str) -> list[str]:
    """Absolute paths of the file (every part of a split GGUF, first first); raises if any is missing."""
    path = os.path.abspath(os.path.expanduser(filename))
    if is_glob(os.path.basename(path)):
        path = _match(path)
    if not os.path.isfile(path):
        raise LocalFileNotFoundError(f"Local model file {path!r} does not exist", param="filename")
    directory = os.path.dirname(path)
    parts = [os.path.join(directory, n) for n in split_part_names(os.path.basename(path))]
    missing = [os.path.basename(p) for p in parts if not os.path.isfile(p)]
    if missing:
        raise LocalFileNotFoundError(
            f"Split GGUF {parts[0]!r} is incomplete; missing next to it: {', '.join(missing)}", param="filename"
        )
    return parts


def _match(pattern: str) -> str:
    """The one file a quant pattern in the last path component names (the same rule as for Hub files)."""
    directory, wanted = os.path.split(pattern)
    try:
        names = [n for n in os.listdir(directory) if os.path.isfile(os.path.join(directory, n))
                 and (wanted.startswith(".") or not n.startswith("."))]  # like a shell glob: no hidden files
    except OSError:
        names = []
    candidates = glob_candidates(names, wanted)
    if not candidates:
        raise LocalFileNotFoundError(f"No local file matches {pattern!r}", param="filename")
    if len(candidates) > 1:
        raise InvalidModelReferenceError(
            f"Pattern {pattern!r} matches {len(candidates)} files: {names_hint(candidates)}", param="filename"
        )
    return os.path.join(directory, candidates[0])


def local_records(parts: list[str], manifest: Manifest, *, rehash: bool) -> list[FileRecord]:
    """Records for ``parts``: from the manifest when size and mtime still match, else freshly hashed."""
    known = manifest.read().files
    records: list[FileRecord] = []
    fresh: list[FileRecord] = []
    for path in parts:
        st = os.stat(path)
        rec = known.get(path)
        if rehash or rec is None or rec.size != st.st_size or rec.mtime_ns != st.st_mtime_ns:
            digest = hash_file(path, follow_symlinks=True)
            rec = FileRecord(repo_id=None, filename=path, revision=None, commit=None, size=digest.size,
                             sha256=digest.sha256, verified_at=utc_now(), path=path, mtime_ns=digest.mtime_ns)
            fresh.append(rec)
        records.append(rec)
    if fresh:
        with manifest.update() as data:
            for rec in fresh:
                data.files[rec.path] = rec
    return records


def forget_local(parts: list[str], manifest: Manifest) -> None:
    """Drop the records; the user's file is theirs and is never deleted."""
    with manifest.update() as data:
        for path in parts:
            data.files.pop(path, None)
