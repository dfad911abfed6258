"""Adopting a model from a Hugging Face cache directory (RunPod's cached models, or any ``$HF_HUB_CACHE``).

Verification first: the file's sha256 (and size) must match the Hub's LFS metadata of the cached commit when the
Hub answers, and the hash the cache recorded (the blob's name) when it does not. ``huggingface_hub`` never hashes
what it downloads, so a cached blob is untrusted until hashed. A file that fails is not used (the caller
downloads it instead) and the source cache is left as it is.

How the file enters the volume: a hard link when the kernel allows one, else a copy. Either way it is staged,
hashed there (the inode we publish is the one we hashed) and published with ``os.replace`` under the file's lock,
like a download (``publish.py``). A hard link costs no time and no space, and keeps the bytes even if the
platform evicts its copy; it is refused across filesystems and, with ``fs.protected_hardlinks``, for a file we
may not write (a root-owned platform cache), so the copy is the fallback. A linked file is not chmod-ed: it
shares its inode with the source cache, which must not be modified. Referencing the file in place is not done:
the platform may replace or evict its cache between starts, and the volume's warm check only trusts regular
files inside the volume.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from typing import Literal

from serve_app.cache.hub import HubClient, RemoteFile, short_reason
from serve_app.cache.integrity import CHUNK_SIZE, hash_file, regular_file_stat
from serve_app.cache.layout import Layout
from serve_app.cache.manifest import SUSPECT_MTIME, FileRecord, Manifest, fsync_dir
from serve_app.cache.publish import Publisher
from serve_app.cache.results import State
from serve_app.cache.sources import HfCache, HfFile, HfSnapshot
from serve_app.config import DownloadConfig, ModelRef
from serve_app.errors import DownloadError
from serve_app.settings import Settings

log = logging.getLogger("serve_app.cache")

AdoptMode = Literal["auto", "link", "copy"]
# A Hub that does not answer must not hold up a start that has the file at hand: the recorded hash is the fallback.
HUB_CHECK_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Adopted:
    """What adoption did: ``present`` (records published), ``missing`` (no cache holds it), ``corrupt``."""

    state: State
    records: list[FileRecord]
    commit: str | None = None
    source: str | None = None
    verified_against: str | None = None  # "hub" or "recorded"


class Adopter:
    def __init__(self, layout: Layout, manifest: Manifest, config: DownloadConfig, publisher: Publisher) -> None:
        self.layout = layout
        self.manifest = manifest
        self.config = config
        self.publisher = publisher

    def adopt(self, ref: ModelRef, cache_dirs: list[str], mode: AdoptMode = "auto") -> Adopted:
        """Find ``ref`` in the first cache that holds it, verify it, publish it on the volume."""
        snap = next((s for s in (HfCache(d).find(ref) for d in cache_dirs if os.path.isdir(d)) if s), None)
        if snap is None:
            return Adopted("missing", [])
        repo_id = ref.repo_id or ""
        expected, against = self._expected(repo_id, snap)
        records: list[FileRecord] = []
        for f in snap.files:
            remote = expected.get(f.name)
            rec = self._publish(repo_id, snap.commit, ref.revision, f, remote, mode) if remote else None
            if rec is None:
                log.warning("%s/%s in the Hugging Face cache %s failed verification against the %s; not using it",
                            repo_id, f.name, snap.cache_dir, "Hub" if against == "hub" else "recorded hash")
                return Adopted("corrupt", records, snap.commit, snap.cache_dir, against)
            records.append(rec)
        log.info("adopted %s/%s@%s from the Hugging Face cache %s (verified against the %s)", repo_id,
                 snap.files[0].name, snap.commit[:12], snap.cache_dir, "Hub" if against == "hub" else "recorded hash")
        return Adopted("present", records, snap.commit, snap.cache_dir, against)

    def _expected(self, repo_id: str, snap: HfSnapshot) -> tuple[dict[str, RemoteFile], str]:
        """What each file must hash to: the Hub's metadata of the commit, or the hash its blob name records."""
        if not Settings().hf_offline:
            try:
                timeout = min(self.config.read_timeout_s, HUB_CHECK_TIMEOUT_S)
                listing = HubClient().listing(repo_id, snap.commit, timeout=timeout)
                return listing.files, "hub"
            except Exception as exc:  # unreachable, gated without a token, ...: the recorded hash still holds
                log.info("Hub metadata for %s@%s unavailable (%s); verifying against the cache's recorded hashes",
                         repo_id, snap.commit[:12], short_reason(exc))
        recorded = {f.name: RemoteFile(f.name, f.size, f.recorded_sha256, f.recorded_git_sha1) for f in snap.files
                    if f.recorded_sha256 or f.recorded_git_sha1}
        return recorded, "recorded"

    def _publish(self, repo_id: str, commit: str, revision: str, f: HfFile, remote: RemoteFile,
                 mode: AdoptMode) -> FileRecord | None:
        key = Layout.file_key(repo_id, commit, f.name)
        with self.layout.locked(key, timeout_s=self.config.lock_timeout_s, what=f"{repo_id}/{f.name}"):
            rec = self.manifest.read().files.get(key)
            final = self.layout.final_path(repo_id, commit, f.name)
            st = regular_file_stat(final)
            if (rec is not None and st is not None and rec.mtime_ns != SUSPECT_MTIME and rec.size == remote.size
                    and (st.st_size, st.st_mtime_ns) == (rec.size, rec.mtime_ns)
                    and remote.sha256 in (None, rec.sha256)):
                return rec  # already on the volume
            staging = self.layout.new_staging(key)
            try:
                staged = os.path.join(staging, os.path.basename(f.name))
                linked = _stage(f.blob, staged, mode)
                sha256 = _verified(staged, remote)
                if sha256 is None:
                    return None
                if not linked:
                    os.chmod(staged, 0o444)
                os.makedirs(os.path.dirname(final), exist_ok=True)
                final = self.layout.final_path(repo_id, commit, f.name)  # re-check: no symlink planted meanwhile
                os.replace(staged, final)
                fsync_dir(os.path.dirname(final))
                log.info("published %s (%s)", final, "hard link" if linked else "copy")
                return self.publisher.record(repo_id, commit, revision, f.name, final,
                                             (sha256, os.lstat(final).st_mtime_ns))
            finally:
                shutil.rmtree(staging, ignore_errors=True)


def _stage(source: str, staged: str, mode: AdoptMode) -> bool:
    """Put ``source`` at ``staged``; True when it is a hard link, False for a copy."""
    if mode != "copy":
        try:
            os.link(source, staged)
            return True
        except OSError as exc:
            if mode == "link":
                raise DownloadError(f"cannot hard-link {source} into the volume ({exc.strerror})") from exc
            log.info("cannot hard-link %s (%s); copying it", source, exc.strerror)
    with open(source, "rb") as src, open(staged, "wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK_SIZE)
        dst.flush()
        os.fsync(dst.fileno())
    return False


def _verified(staged: str, remote: RemoteFile) -> str | None:
    """The sha256 of the staged file when its size and hash are the expected ones; None otherwise."""
    digest = hash_file(staged, git=remote.sha256 is None)
    if digest.size != remote.size:
        return None
    if remote.sha256 is not None:
        return digest.sha256 if digest.sha256 == remote.sha256 else None
    return digest.sha256 if digest.git_sha1 == remote.git_sha1 else None

