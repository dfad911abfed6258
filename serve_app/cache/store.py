"""ModelStore: the model volume's public API (ensure, status, verify, heal, invalidate, list).

Warm path: when the manifest knows a reference (a branch is pinned to the commit it resolved to on the first
pull; a 40-hex revision is looked up directly), ``ensure``/``status`` make zero network requests and cost one
manifest read plus one ``lstat`` per file. A size or mtime mismatch triggers a full re-hash. ``ensure(ref,
refresh=True)`` re-resolves the revision on the Hub. ``HF_HUB_OFFLINE`` is read (through ``Settings``) at call
time. How a file is published: ``publish.py``; how it is checked: ``checks.py``; a lost or damaged manifest is
rebuilt by ``recovery.py``.

Lookup order for a Hub reference: the baked image directory (``Settings.baked_dir``; read-only, trusted on size)
-> this volume -> a Hugging Face cache (``Settings.hf_cache_dirs``: adopted after verification, ``adopt.py``)
-> the Hub. ``sources.py`` says why each source is trusted as it is.
"""

from __future__ import annotations

import logging
import os

from serve_app.cache.adopt import Adopted, Adopter, AdoptMode
from serve_app.cache.checks import Checker
from serve_app.cache.hub import (
    HubClient,
    RepoListing,
    is_transient,
    retry_policy,
    select_files,
    to_serve_error,
)
from serve_app.cache.layout import Layout
from serve_app.cache.local import forget_local, local_parts, local_records
from serve_app.cache.manifest import FileRecord, Manifest, RefRecord, ref_key, utc_now
from serve_app.cache.names import (
    split_part_names,
    validate_filename,
    validate_repo_id,
    validate_revision,
)
from serve_app.cache.publish import Publisher
from serve_app.cache.recovery import rebuild
from serve_app.cache.results import (
    CachedFile,
    CacheStatus,
    StoreStats,
    cached_from_records,
    local_cached,
    present,
)
from serve_app.cache.sources import BakedImage, HfCache, known_in
from serve_app.config import DownloadConfig, ModelRef
from serve_app.errors import NotCachedError, ServeError
from serve_app.retry import Deadline, RetriesExhausted, retry
from serve_app.settings import Settings

__all__ = ["CacheStatus", "CachedFile", "ModelStore", "StoreStats"]

log = logging.getLogger("serve_app.cache")


class ModelStore:
    def __init__(self, cache_dir: str, download: DownloadConfig | None = None, *, progress: str = "auto",
                 baked_dir: str | None = None, hf_cache_dirs: list[str] | None = None) -> None:
        """``baked_dir`` / ``hf_cache_dirs``: None reads ``Settings``; "" / [] turn that source off."""
        if baked_dir is None or hf_cache_dirs is None:
            settings = Settings()
            baked_dir = settings.baked_dir if baked_dir is None else baked_dir
            hf_cache_dirs = list(settings.hf_cache_dirs) if hf_cache_dirs is None else hf_cache_dirs
        self.stats = StoreStats()
        self.config = download or DownloadConfig()
        self.layout = Layout(cache_dir)
        self.manifest = Manifest(self.layout.manifest_path, self.layout.lock_path("manifest"),
                                 recover=lambda: rebuild(self.layout))
        self._checker = Checker(self.layout, self.manifest)
        self._publisher = Publisher(self.layout, self.manifest, self.config, self.stats, progress)
        self._adopter = Adopter(self.layout, self.manifest, self.config, self._publisher)
        # The baked directory is also where the image build pulls to: there it is this volume, not a source.
        self.baked = BakedImage(baked_dir) if baked_dir and os.path.realpath(baked_dir) != self.layout.root else None
        self.hf_cache_dirs = list(hf_cache_dirs)

    # ---- public API --------------------------------------------------------------------------------------------

    def ensure(self, ref: ModelRef, *, refresh: bool = False) -> CachedFile:
        """The verified file(s) of ``ref``, downloading what is missing or corrupt."""
        if ref.is_local:
            parts = local_parts(ref.filename)
            return local_cached(parts, local_records(parts, self.manifest, rehash=False))
        repo_id = _validate(ref)
        baked = None if refresh or self.baked is None else self.baked.find(ref)
        if baked is not None:
            self.stats.hits += 1
            return baked
        self.layout.sweep_staging()  # a killed pull of any file is cleaned up by the next pull of any file
        known = None if refresh else self._known(ref)
        if known is not None:
            state, records = self._checker.evaluate(repo_id, known[0], known[1], rehash=False)
            if state == "present":
                self.stats.hits += 1
                return cached_from_records(self.layout, ref.revision, records)
            if state == "corrupt":
                self.stats.verify_failures += 1
            log.warning("%s/%s is %s in the cache; fetching it again", repo_id, known[1][0], state)
        if not refresh and self.hf_cache_dirs:
            adopted = self.adopt(ref, self.hf_cache_dirs)
            if adopted.state == "present":
                self.stats.hits += 1
                return cached_from_records(self.layout, ref.revision, adopted.records)
            if adopted.state == "corrupt":
                self.stats.verify_failures += 1
        self.stats.misses += 1
        return self._fetch(ref, ref)

    def adopt(self, ref: ModelRef, cache_dirs: list[str], mode: AdoptMode = "auto") -> Adopted:
        """Verify ``ref`` in the first Hugging Face cache that holds it and publish it on this volume."""
        if ref.is_local:
            return Adopted("missing", [])
        _validate(ref)
        adopted = self._adopter.adopt(ref, cache_dirs, mode)
        if adopted.state == "present" and adopted.commit is not None:
            self._remember(ref, adopted.commit, [r.filename for r in adopted.records])
        return adopted

    def status(self, ref: ModelRef) -> CacheStatus:
        """Warm check: manifest + stat; re-hash only on a mismatch. Network only for a reference never pulled."""
        return self._inspect(ref, rehash=False)

    def verify(self, ref: ModelRef) -> CacheStatus:
        """Like ``status`` but always re-hashes every part."""
        return self._inspect(ref, rehash=True)

    def heal(self, ref: ModelRef) -> CachedFile:
        """Re-hash every part; re-fetch the corrupt or missing ones at the same commit.

        Equivalent to invalidate + ensure, but a split GGUF only re-downloads its bad parts: ``verify`` marks them
        suspect in the manifest and ``Publisher.obtain`` replaces a suspect file without hashing it again.
        """
        checked = self.verify(ref)
        if checked.state == "present" or ref.is_local:
            return self.ensure(ref)
        log.warning("healing %s/%s: it is %s", ref.repo_id, checked.filename, checked.state)
        pinned = ref.model_copy(update={"revision": checked.commit or ref.revision})
        return self._fetch(ref, pinned)

    def invalidate(self, ref: ModelRef) -> None:
        """Delete the cached file(s) of ``ref`` and their records (a local file's record only, never the file).
        Nothing outside the volume is deleted, whatever the manifest or the volume holds (``Publisher.unpublish``).
        """
        if ref.is_local:
            try:
                forget_local(local_parts(ref.filename), self.manifest)
            except ServeError:
                pass
            return
        repo_id = _validate(ref)
        known = self._known(ref)
        if known is None:
            return
        commit, names = known
        keys = {Layout.file_key(repo_id, commit, n) for n in names}
        for name in names:
            key = Layout.file_key(repo_id, commit, name)
            with self.layout.locked(key, timeout_s=self.config.lock_timeout_s, what=f"{repo_id}/{name}"):
                self._publisher.unpublish(repo_id, commit, name)
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
                out.append(cached_from_records(self.layout, rec.revision or "", [p for p in parts if p is not None]))
        return out

    # ---- resolution --------------------------------------------------------------------------------------------

    def _known(self, ref: ModelRef) -> tuple[str, list[str]] | None:
        """(commit, filenames) of ``ref`` from the manifest alone, or None."""
        return known_in(self.manifest.read(), ref)

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
        repo_id = ref.repo_id or ""
        with self.manifest.update() as data:
            data.refs[ref_key(repo_id, ref.filename, ref.revision)] = RefRecord(
                repo_id=repo_id, requested=ref.filename, revision=ref.revision, commit=commit, files=names,
                resolved_at=utc_now(),
            )

    # ---- checking and fetching ---------------------------------------------------------------------------------

    def _inspect(self, ref: ModelRef, *, rehash: bool) -> CacheStatus:
        if ref.is_local:
            try:
                parts = local_parts(ref.filename)
            except ServeError:
                return CacheStatus(state="missing", repo_id=None, filename=ref.filename, revision=None)
            return present(local_cached(parts, local_records(parts, self.manifest, rehash=rehash)))
        repo_id = _validate(ref)
        baked = self.baked.find(ref, rehash=rehash) if self.baked is not None else None
        if baked is not None:
            return present(baked)
        known = self._known(ref)
        if known is None:
            if Settings().hf_offline:
                return CacheStatus(state="missing", repo_id=repo_id, filename=ref.filename, revision=ref.revision,
                                   adoptable_from=self._adoptable(ref))
            listing = self._listing(HubClient(), ref)
            known = listing.commit, [f.name for f in select_files(listing, ref.filename)]
        state, records = self._checker.evaluate(repo_id, known[0], known[1], rehash=rehash)
        if state == "missing" or len(records) != len(known[1]):
            return CacheStatus(state="missing", repo_id=repo_id, filename=known[1][0], revision=ref.revision,
                               commit=known[0], adoptable_from=self._adoptable(ref))
        return CacheStatus(state=state, **cached_from_records(self.layout, ref.revision, records).model_dump())

    def _adoptable(self, ref: ModelRef) -> str | None:
        """The first configured Hugging Face cache holding every part of ``ref`` (not verified here: read-only)."""
        return next((d for d in self.hf_cache_dirs if os.path.isdir(d) and HfCache(d).find(ref)), None)

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
        records: list[FileRecord] = [
            self._publisher.obtain(hub, listing.repo_id, listing.commit, ref.revision, f) for f in files
        ]
        self._remember(ref, listing.commit, [f.name for f in files])
        return cached_from_records(self.layout, ref.revision, records)


def _validate(ref: ModelRef) -> str:
    """The reference's repo id, once every part of the reference passed the naming rules."""
    validate_repo_id(ref.repo_id or "")
    validate_filename(ref.filename)
    validate_revision(ref.revision)
    return ref.repo_id or ""
