"""Per-file records beside the manifest, and rebuilding the manifest from them when it is lost or damaged.

When a file is published its ``FileRecord`` (whose sha256 is the Hub's, checked while the bytes arrived) is also
written to ``.records/<key-hash>.json``. Rebuilding re-hashes each recorded file and adopts it only when its size
and sha256 still match that record; the refs of exact filenames are rebuilt from the records' revisions (the
most recently verified commit wins), so a warm start finds them again with no network.

Why only that, offline: without the Hub there is nothing else to check a file's bytes against, and a file on the
volume whose record is missing or disagrees may be partial, tampered with or from another commit, so it is left
for the next online pull, which re-adopts it if it matches the Hub's sha256 (or replaces it). Refs of quant
patterns are not rebuilt: which file a pattern meant is only known to the Hub's listing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid

from pydantic import ValidationError

from serve_app.cache.integrity import hash_file
from serve_app.cache.layout import Layout
from serve_app.cache.manifest import FileRecord, ManifestData, RefRecord, ref_key, utc_now
from serve_app.cache.names import split_part_names
from serve_app.errors import IntegrityError, ServeError

log = logging.getLogger("serve_app.cache")

_MAX_RECORD_BYTES = 64 * 1024


def save_record(layout: Layout, rec: FileRecord) -> None:
    """Write ``rec`` beside the manifest (atomically: a torn record is never read back as a good one)."""
    path = layout.record_path(rec.key())
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(rec.model_dump_json())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def drop_record(layout: Layout, key: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(layout.record_path(key))


def rebuild(layout: Layout) -> ManifestData | None:
    """Records (and exact-filename refs) of every file that still matches its record; None if there are none."""
    try:
        entries = sorted(e for e in os.listdir(layout.records_dir) if e.endswith(".json"))
    except FileNotFoundError:
        return None
    if not entries:
        return None
    data = ManifestData()
    originals: dict[str, FileRecord] = {}
    for entry in entries:
        rec = _load(layout, entry)
        mtime_ns = _still_matches(layout, rec) if rec is not None and rec.repo_id is not None else None
        if rec is not None and mtime_ns is not None:
            originals[rec.key()] = rec
            data.files[rec.key()] = rec.model_copy(update={"mtime_ns": mtime_ns, "verified_at": utc_now()})
    _rebuild_refs(data, originals)
    log.warning("rebuilt the manifest of %s from %d verified file record(s) of %d", layout.root, len(data.files),
                len(entries))
    return data


def _load(layout: Layout, entry: str) -> FileRecord | None:
    path = os.path.join(layout.records_dir, entry)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            rec = FileRecord.model_validate_json(f.read(_MAX_RECORD_BYTES))
    except (OSError, ValidationError) as exc:
        log.warning("ignoring unreadable file record %s (%s)", entry, type(exc).__name__)
        return None
    if layout.record_path(rec.key()) != path:
        log.warning("ignoring file record %s: it is filed under another file's name", entry)
        return None
    return rec


def _still_matches(layout: Layout, rec: FileRecord) -> int | None:
    """The file's mtime if its bytes are still the ones verified when it was published, else None."""
    try:
        final = layout.final_path(rec.repo_id or "", rec.commit or "", rec.filename)
        digest = hash_file(final)
    except FileNotFoundError:
        return None
    except (OSError, IntegrityError) as exc:
        log.warning("not adopting %s: %s", rec.path, exc)
        return None
    if (digest.size, digest.sha256) != (rec.size, rec.sha256):
        log.warning("not adopting %s: its bytes no longer match the sha256 verified when it was published", rec.path)
        return None
    return digest.mtime_ns


def _rebuild_refs(data: ManifestData, records: dict[str, FileRecord]) -> None:
    by_ref: dict[str, RefRecord] = {}
    for rec in sorted(records.values(), key=lambda r: r.verified_at):  # later pulls overwrite earlier ones
        try:
            parts = split_part_names(os.path.basename(rec.filename))
        except ServeError:
            continue
        if rec.revision is None or os.path.basename(rec.filename) != parts[0]:
            continue
        prefix = rec.filename[: len(rec.filename) - len(parts[0])]
        names = [prefix + p for p in parts]
        if all(Layout.file_key(rec.repo_id or "", rec.commit or "", n) in records for n in names):
            by_ref[ref_key(rec.repo_id or "", rec.filename, rec.revision)] = RefRecord(
                repo_id=rec.repo_id or "", requested=rec.filename, revision=rec.revision, commit=rec.commit or "",
                files=names, resolved_at=rec.verified_at)
    data.refs.update(by_ref)
