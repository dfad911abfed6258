"""ModelStore: the model volume's public API (ensure, status, verify, heal, invalidate, list).

A file becomes visible at its final path only after its size and sha256 matched the Hub's LFS metadata:
it is received in a private staging directory, verified, fsynced, then published with ``os.replace``. The
manifest is written after publishing; a published file without a record is re-adopted by hash.

Warm path: when the manifest knows a reference (a branch is pinned to the commit it resolved to on the first
pull; a 40-hex revision is looked up directly), ``ensure``/``status`` make zero network requests and cost one
manifest read plus one ``lstat`` per file. A size or mtime mismatch triggers a full re-hash. ``ensure(ref,
refresh=True)`` re-resolves the revision on the Hub. ``HF_HUB_OFFLINE`` is read at call time.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from serve_app.cache.fetch import FetchJob, download_verified
from serve_app.cache.hub import (
    HubClient,
    RemoteFile,
    RepoListing,
    is_transient,
    retry_policy,
    select_files,
    to_serve_error,
)
from serve_app.cache.integrity import hash_file, regular_file_stat
from serve_app.cache.layout import Layout
from serve_app.cache.local import forget_local, local_parts, local_records
from serve_app.cache.manifest import (
    SUSPECT_MTIME,
    FileRecord,
    Manifest,
    RefRecord,
    fsync_dir,
    ref_key,
    utc_now,
)
from serve_app.cache.names import (
    COMMIT_RE,
    is_glob,
    split_part_names,
    validate_filename,
    validate_repo_id,
    validate_revision,
)
from serve_app.config import DownloadConfig, ModelRef
from serve_app.errors import IntegrityError, NotCachedError, ServeError
from serve_app.retry import Deadline, RetriesExhausted, retry
from serve_app.settings import Settings

log = logging.getLogger("serve_app.cache")

State = Literal["present", "missing", "corrupt"]


class CachedFile(BaseModel):
    """A verified model on the volume. ``path == parts[0]``; ``size`` is the total over parts, ``sha256`` the first
    part's."""

    repo_id: str | None
    filename: str
    revision: str
    commit: str | None
    path: str
    size: int
    sha256: str
    verified_at: str
    parts: list[str]


class CacheStatus(BaseModel):
    state: State
    repo_id: str | None
    filename: str
    revision: str | None
    commit: str | None = None
    path: str | None = None
    size: int | None = None
    sha256: str | None = None
    verified_at: str | None = None
    parts: list[str] = []


@dataclass
class StoreStats:
    """Monotonic counters for metrics (read by the ModelCache deployment)."""

    hits: int = 0
    misses: int = 0
    downloads: int = 0
    download_bytes: int = 0
    verify_failures: int = 0


class ModelStore:
    def __init__(self, cache_dir: str, download: DownloadConfig | None = None, *, progress: str = "auto") -> None:
        self.stats = StoreStats()
        self.config = download or DownloadConfig()
        self.layout = Layout(cache_dir)
        self.manifest = Manifest(self.layout.manifest_path, self.layout.lock_path("manifest"))
        self.progress = progress

    # ---- public API --------------------------------------------------------------------------------------------

    def ensure(self, ref: ModelRef, *, refresh: bool = False) -> CachedFile:
        """The verified file(s) of ``ref``, downloading what is missing or corrupt."""
        if ref.is_local:
            parts = local_parts(ref.filename)
            return _local_cached(parts, local_records(parts, self.manifest, rehash=False))
        _validate(ref)
        self.layout.sweep_staging()  # a killed pull of any file is cleaned up by the next pull of any file
        known = None if refresh else self._known(ref)
        if known is not None:
            state, records = self._evaluate(ref.repo_id or "", known[0], known[1], rehash=False)
            if state == "present":
                self.stats.hits += 1
                return self._cached(ref, records)
            if state == "corrupt":
                self.stats.verify_failures += 1
            log.warning("%s/%s is %s in the cache; fetching it again", ref.repo_id, known[1][0], state)
        self.stats.misses += 1
        return self._fetch(ref, ref)

    def status(self, ref: ModelRef) -> CacheStatus:
        """Warm check: manifest + stat; re-hash only on a mismatch. Network only for a reference never pulled."""
        return self._inspect(ref, rehash=False)

    def verify(self, ref: ModelRef) -> CacheStatus:
        """Like ``status`` but always re-hashes every part."""
        return self._inspect(ref, rehash=True)

    def heal(self, ref: ModelRef) -> CachedFile:
        """Re-hash every part; re-fetch the corrupt or missing ones at the same commit.

        Equivalent to invalidate + ensure, but a split GGUF only re-downloads its bad parts: ``verify`` marks them
        suspect in the manifest and ``_obtain`` replaces a suspect file without hashing it again.
        """
        checked = self.verify(ref)
        if checked.state == "present" or ref.is_local:
            return self.ensure(ref)
        log.warning("healing %s/%s: it is %s", ref.repo_id, checked.filename, checked.state)
        pinned = ref.model_copy(update={"revision": checked.commit or ref.revision})
        return self._fetch(ref, pinned)

    def invalidate(self, ref: ModelRef) -> None:
        """Delete the cached file(s) of ``ref`` and their records (a local file's record only, never the file)."""
        if ref.is_local:
            try:
                forget_local(local_parts(ref.filename), self.manifest)
            except ServeError:
                pass
            return
        _validate(ref)
        known = self._known(ref)
        if known is None:
            return
        commit, names = known
        keys = {Layout.file_key(ref.repo_id or "", commit, n) for n in names}
        for name in names:
            key = Layout.file_key(ref.repo_id or "", commit, name)
            with self.layout.locked(key, timeout_s=self.config.lock_timeout_s, what=f"{ref.repo_id}/{name}"):
                self._unpublish(ref.repo_id or "", commit, name)
                with self.manifest.update() as data:
                    data.files.pop(key, None)
        with self.manifest.update() as data:
            for rk, rr in list(data.refs.items()):
                if keys & {Layout.file_key(rr.repo_id, rr.commit, n) for n in rr.files}:
                    del data.refs[rk]

    def list(self) -> list[CachedFile]:
        """Every model recorded in the manifest (split GGUFs once, by their first part)."""
        files = self.manifest.read().files
        out: list[CachedFile] = []
        for key, rec in sorted(files.items()):
            names = split_part_names(os.path.basename(rec.filename))
            if os.path.basename(rec.filename) != names[0]:
                continue
            prefix = key[: len(key) - len(names[0])]
            parts = [files.get(prefix + n) for n in names]
            if all(p is not None for p in parts):
                out.append(self._from_records(rec.revision or "", [p for p in parts if p is not None]))
        return out

    # ---- resolution --------------------------------------------------------------------------------------------

    def _known(self, ref: ModelRef) -> tuple[str, list[str]] | None:
        """(commit, filenames) of ``ref`` from the manifest alone, or None."""
        assert ref.repo_id is not None
        data = self.manifest.read()
        rr = data.refs.get(ref_key(ref.repo_id, ref.filename, ref.revision))
        if rr is not None:
            return rr.commit, rr.files
        if COMMIT_RE.fullmatch(ref.revision) and not is_glob(ref.filename):
            names = split_part_names(ref.filename)
            if all(Layout.file_key(ref.repo_id, ref.revision, n) in data.files for n in names):
                return ref.revision, names
        return None

    def _listing(self, hub: HubClient, ref: ModelRef) -> RepoListing:
        repo_id = ref.repo_id or ""

        def to_error(exc: BaseException) -> ServeError:
            return to_serve_error(exc, endpoint=hub.endpoint, repo_id=repo_id, revision=ref.revision)

        deadline = Deadline(self.config.timeout_s)
        try:
            return retry(lambda: hub.listing(repo_id, ref.revision, timeout=deadline.io_timeout(
                self.config.read_timeout_s)), retry_policy(self.config), deadline, retryable=is_transient,
                what=f"metadata of {repo_id}@{ref.revision}")
        except RetriesExhausted as exc:
            raise to_error(exc.last) from exc.last
        except Exception as exc:  # permanent: one request, a typed error at once
            raise to_error(exc) from exc

    def _remember(self, ref: ModelRef, commit: str, names: list[str]) -> None:
        assert ref.repo_id is not None
        with self.manifest.update() as data:
            data.refs[ref_key(ref.repo_id, ref.filename, ref.revision)] = RefRecord(
                repo_id=ref.repo_id, requested=ref.filename, revision=ref.revision, commit=commit, files=names,
                resolved_at=utc_now(),
            )

    # ---- checking ----------------------------------------------------------------------------------------------

    def _inspect(self, ref: ModelRef, *, rehash: bool) -> CacheStatus:
        if ref.is_local:
            try:
                parts = local_parts(ref.filename)
            except ServeError:
                return CacheStatus(state="missing", repo_id=None, filename=ref.filename, revision=None)
            return _local_status(_local_cached(parts, local_records(parts, self.manifest, rehash=rehash)))
        _validate(ref)
        known = self._known(ref)
        if known is None:
            if Settings().hf_offline:
                return CacheStatus(state="missing", repo_id=ref.repo_id, filename=ref.filename, revision=ref.revision)
            hub = HubClient()
            listing = self._listing(hub, ref)
            known = listing.commit, [f.name for f in select_files(listing, ref.filename)]
        state, records = self._evaluate(ref.repo_id or "", known[0], known[1], rehash=rehash)
        if state == "missing" or len(records) != len(known[1]):
            return CacheStatus(state="missing", repo_id=ref.repo_id, filename=known[1][0], revision=ref.revision,
                               commit=known[0])
        cached = self._cached(ref, records)
        return CacheStatus(state=state, **cached.model_dump(exclude={"revision"}), revision=ref.revision)

    def _evaluate(
        self, repo_id: str, commit: str, names: list[str], *, rehash: bool
    ) -> tuple[State, list[FileRecord]]:
        """Worst state over the parts ("corrupt" > "missing" > "present"); updated records are persisted."""
        assert names
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
            state, updated = self._check(rec, rehash=rehash)
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

    def _check(self, rec: FileRecord, *, rehash: bool) -> tuple[State, FileRecord | None]:
        try:
            path = self.layout.absolute(rec.path)
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

    # ---- fetching ----------------------------------------------------------------------------------------------

    def _fetch(self, ref: ModelRef, resolve: ModelRef) -> CachedFile:
        """Resolve ``resolve`` on the Hub and obtain its files; the manifest pins ``ref`` to the result."""
        if Settings().hf_offline:
            raise NotCachedError(
                f"{ref.repo_id}/{ref.filename}@{ref.revision} is not in the cache at {self.layout.root} "
                "(or failed verification) and HF_HUB_OFFLINE=1 forbids downloading it"
            )
        hub = HubClient()
        listing = self._listing(hub, resolve)
        files = select_files(listing, resolve.filename)
        records = [self._obtain(hub, listing.repo_id, listing.commit, ref.revision, f) for f in files]
        self._remember(ref, listing.commit, [f.name for f in files])
        return self._cached(ref, records)

    def _obtain(self, hub: HubClient, repo_id: str, commit: str, revision: str, remote: RemoteFile) -> FileRecord:
        """Under the file's lock: reuse what another process published, adopt a matching file, or download."""
        key = Layout.file_key(repo_id, commit, remote.name)
        final = self.layout.final_path(repo_id, commit, remote.name)
        with self.layout.locked(key, timeout_s=self.config.lock_timeout_s, what=f"{repo_id}/{remote.name}"):
            self.layout.sweep_staging(held_key=key)
            rec = self.manifest.read().files.get(key)
            st = regular_file_stat(final)
            if _still_valid(rec, st, remote):
                assert rec is not None
                return rec
            if st is not None and (rec is None or rec.mtime_ns != SUSPECT_MTIME):
                adopted = self._adopt(final, remote)
                if adopted is not None:
                    return self._record(repo_id, commit, revision, remote.name, final, adopted)
            if st is not None:
                os.unlink(final)
            sha256, mtime_ns = self._download(hub, repo_id, commit, remote, key, final)
            return self._record(repo_id, commit, revision, remote.name, final, (sha256, mtime_ns))

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

    def _record(
        self, repo_id: str, commit: str, revision: str, name: str, final: str, digest: tuple[str, int]
    ) -> FileRecord:
        rec = FileRecord(
            repo_id=repo_id, filename=name, revision=revision, commit=commit, size=os.lstat(final).st_size,
            sha256=digest[0], verified_at=utc_now(), path=Layout.relative_path(repo_id, commit, name),
            mtime_ns=digest[1],
        )
        with self.manifest.update() as data:
            data.files[Layout.file_key(repo_id, commit, name)] = rec
        return rec

    def _unpublish(self, repo_id: str, commit: str, name: str) -> None:
        try:
            final = self.layout.final_path(repo_id, commit, name)
        except IntegrityError:
            final = os.path.join(self.layout.root, Layout.relative_path(repo_id, commit, name))
        if os.path.lexists(final):
            os.unlink(final)  # a symlink is removed, never followed
        self.layout.remove_empty_parents(final)

    # ---- results -----------------------------------------------------------------------------------------------

    def _cached(self, ref: ModelRef, records: list[FileRecord]) -> CachedFile:
        return self._from_records(ref.revision, records)

    def _from_records(self, revision: str, records: list[FileRecord]) -> CachedFile:
        first = records[0]
        parts = [self.layout.display_path(r.path) for r in records]
        return CachedFile(
            repo_id=first.repo_id, filename=first.filename, revision=revision, commit=first.commit, path=parts[0],
            size=sum(r.size for r in records), sha256=first.sha256,
            verified_at=min(r.verified_at for r in records), parts=parts,
        )


def _validate(ref: ModelRef) -> None:
    validate_repo_id(ref.repo_id or "")
    validate_filename(ref.filename)
    validate_revision(ref.revision)


def _still_valid(rec: FileRecord | None, st: os.stat_result | None, remote: RemoteFile) -> bool:
    """The published file is the one the manifest verified (another process just published it, typically)."""
    if rec is None or st is None or rec.mtime_ns == SUSPECT_MTIME:
        return False
    same_content = rec.size == remote.size and (remote.sha256 is None or rec.sha256 == remote.sha256)
    return same_content and (st.st_size, st.st_mtime_ns) == (rec.size, rec.mtime_ns)


def _local_cached(parts: list[str], records: list[FileRecord]) -> CachedFile:
    return CachedFile(
        repo_id=None, filename=parts[0], revision="local", commit=None, path=parts[0],
        size=sum(r.size for r in records), sha256=records[0].sha256,
        verified_at=min(r.verified_at for r in records), parts=parts,
    )


def _local_status(cached: CachedFile) -> CacheStatus:
    return CacheStatus(state="present", **cached.model_dump())
