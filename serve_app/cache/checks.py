"""Is what the manifest records still on the volume, unchanged? A warm check is one ``lstat`` per file; a size or
mtime mismatch (or ``rehash``) re-hashes the file against its recorded sha256."""

from __future__ import annotations

import logging

from serve_app.cache.integrity import hash_file, regular_file_stat
from serve_app.cache.layout import Layout
from serve_app.cache.manifest import SUSPECT_MTIME, FileRecord, Manifest, utc_now
from serve_app.cache.results import State
from serve_app.errors import IntegrityError

log = logging.getLogger("serve_app.cache")


class Checker:
    def __init__(self, layout: Layout, manifest: Manifest) -> None:
        self.layout = layout
        self.manifest = manifest

    def evaluate(self, repo_id: str, commit: str, names: list[str], *, rehash: bool) -> tuple[State, list[FileRecord]]:
        """Worst state over the parts ("corrupt" > "missing" > "present"); updated records are persisted."""
        if not names:
            return "missing", []
        files = self.manifest.read().files
        original = dict(files)
        states: list[State] = []
        records: list[FileRecord] = []
        changed: dict[str, FileRecord] = {}
        for key in (Layout.file_key(repo_id, commit, n) for n in names):
            rec = files.get(key)
            if rec is None:
                states.append("missing")
                continue
            state, updated = self.check(rec, rehash=rehash)
            states.append(state)
            records.append(updated or rec)
            if updated is not None:
                changed[key] = updated
        if changed:
            with self.manifest.update() as data:
                # Skip records another process rewrote meanwhile (it re-published the file).
                data.files.update({k: v for k, v in changed.items() if data.files.get(k) == original[k]})
        worst: State = "corrupt" if "corrupt" in states else "missing" if "missing" in states else "present"
        return worst, records

    def check(self, rec: FileRecord, *, rehash: bool) -> tuple[State, FileRecord | None]:
        """The state of one Hub file, and its updated record when that changed."""
        try:
            # Derived from the record's repo, commit and name (never its stored path) and checked for containment.
            path = self.layout.final_path(rec.repo_id or "", rec.commit or "", rec.filename)
            st = regular_file_stat(path)
        except IntegrityError as exc:
            log.warning("%s", exc)
            return "corrupt", rec.model_copy(update={"mtime_ns": SUSPECT_MTIME})
        if st is None:
            return "missing", None
        if not rehash and rec.mtime_ns != SUSPECT_MTIME and (st.st_size, st.st_mtime_ns) == (rec.size, rec.mtime_ns):
            return "present", None
        digest = hash_file(path)
        if (digest.size, digest.sha256) == (rec.size, rec.sha256):
            return "present", rec.model_copy(update={"mtime_ns": digest.mtime_ns, "verified_at": utc_now()})
        log.warning("%s is corrupt: sha256 %s..., expected %s...", rec.path, digest.sha256[:12], rec.sha256[:12])
        return "corrupt", rec.model_copy(update={"mtime_ns": SUSPECT_MTIME})
