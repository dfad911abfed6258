"""Putting a Hub file on the volume, and taking it off again.

A file becomes visible at its final path only after its size and sha256 matched the Hub's LFS metadata: it is
received in a private staging directory, verified, fsynced, then published with ``os.replace``. Its record goes
to the manifest and then beside it (``recovery.py``); a published file without a record is re-adopted by hash.
Everything here runs under the file's cross-process lock.
"""

from __future__ import annotations

import logging
import os
import shutil

from serve_app.cache.fetch import FetchJob, download_verified
from serve_app.cache.hub import HubClient, RemoteFile
from serve_app.cache.integrity import hash_file, regular_file_stat
from serve_app.cache.layout import Layout
from serve_app.cache.manifest import SUSPECT_MTIME, FileRecord, Manifest, fsync_dir, utc_now
from serve_app.cache.recovery import drop_record, save_record
from serve_app.cache.results import StoreStats
from serve_app.config import DownloadConfig
from serve_app.retry import Deadline

log = logging.getLogger("serve_app.cache")


class Publisher:
    def __init__(self, layout: Layout, manifest: Manifest, config: DownloadConfig, stats: StoreStats,
                 progress: str) -> None:
        self.layout = layout
        self.manifest = manifest
        self.config = config
        self.stats = stats
        self.progress = progress

    def obtain(self, hub: HubClient, repo_id: str, commit: str, revision: str, remote: RemoteFile) -> FileRecord:
        """Under the file's lock: reuse what another process published, adopt a matching file, or download."""
        key = Layout.file_key(repo_id, commit, remote.name)
        final = self.layout.final_path(repo_id, commit, remote.name)
        with self.layout.locked(key, timeout_s=self.config.lock_timeout_s, what=f"{repo_id}/{remote.name}"):
            self.layout.sweep_staging(held_key=key)
            rec = self.manifest.read().files.get(key)
            st = regular_file_stat(final)
            if rec is not None and _still_valid(rec, st, remote):
                return rec
            if st is not None and (rec is None or rec.mtime_ns != SUSPECT_MTIME):
                adopted = self._adopt(final, remote)
                if adopted is not None:
                    return self.record(repo_id, commit, revision, remote.name, final, adopted)
            if st is not None:
                os.unlink(final)
            sha256, mtime_ns = self._download(hub, repo_id, commit, remote, key, final)
            return self.record(repo_id, commit, revision, remote.name, final, (sha256, mtime_ns))

    def unpublish(self, repo_id: str, commit: str, name: str) -> None:
        """Delete the published file (a symlink there is removed, never followed) and its side record."""
        final = self.layout.deletable_path(repo_id, commit, name)
        if final is None:
            log.warning("not deleting %s/%s@%s: its path leaves the cache directory or passes through a symlink",
                        repo_id, name, commit[:60])
        else:
            if os.path.lexists(final):
                os.unlink(final)
            self.layout.remove_empty_parents(final)
        drop_record(self.layout, Layout.file_key(repo_id, commit, name))

    def _count_corrupt(self) -> None:
        self.stats.verify_failures += 1

    def _adopt(self, final: str, remote: RemoteFile) -> tuple[str, int] | None:
        """A file already at the final path (manifest lost, or touched) is kept if its content is right."""
        digest = hash_file(final, git=remote.sha256 is None)
        ok = digest.size == remote.size and (
            digest.sha256 == remote.sha256 if remote.sha256 else digest.git_sha1 == remote.git_sha1
        )
        if not ok:
            log.warning("%s does not match the Hub; replacing it", final)
            return None
        log.info("re-adopted verified file %s", final)
        return digest.sha256, digest.mtime_ns

    def _download(
        self, hub: HubClient, repo_id: str, commit: str, remote: RemoteFile, key: str, final: str
    ) -> tuple[str, int]:
        staging = self.layout.new_staging(key)
        try:
            job = FetchJob(hub=hub, repo_id=repo_id, commit=commit, remote=remote, staging_dir=staging,
                           config=self.config, deadline=Deadline(self.config.timeout_s), progress=self.progress,
                           free_bytes=self.layout.free_bytes(), on_corrupt=self._count_corrupt)
            log.info("downloading %s/%s (%d bytes, commit %s)", repo_id, remote.name, remote.size, commit[:12])
            staged, sha256 = download_verified(job)
            os.chmod(staged, 0o444)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            final = self.layout.final_path(repo_id, commit, remote.name)  # re-check: no symlink planted meanwhile
            os.replace(staged, final)
            fsync_dir(os.path.dirname(final))
            log.info("published %s", final)
            self.stats.downloads += 1
            self.stats.download_bytes += remote.size
            return sha256, os.lstat(final).st_mtime_ns
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def record(
        self, repo_id: str, commit: str, revision: str, name: str, final: str, digest: tuple[str, int]
    ) -> FileRecord:
        rec = FileRecord(
            repo_id=repo_id, filename=name, revision=revision, commit=commit, size=os.lstat(final).st_size,
            sha256=digest[0], verified_at=utc_now(), path=Layout.relative_path(repo_id, commit, name),
            mtime_ns=digest[1],
        )
        with self.manifest.update() as data:
            data.files[rec.key()] = rec
        # After the manifest: a first pull on a fresh volume must not look like a lost manifest with records.
        save_record(self.layout, rec)
        return rec


def _still_valid(rec: FileRecord, st: os.stat_result | None, remote: RemoteFile) -> bool:
    """The published file is the one the manifest verified (another process just published it, typically)."""
    if st is None or rec.mtime_ns == SUSPECT_MTIME:
        return False
    same_content = rec.size == remote.size and (remote.sha256 is None or rec.sha256 == remote.sha256)
    return same_content and (st.st_size, st.st_mtime_ns) == (rec.size, rec.mtime_ns)
