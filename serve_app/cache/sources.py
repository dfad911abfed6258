"""Model sources other than this volume and the Hub: a baked image directory and Hugging Face cache directories.

Lookup order of ``ModelStore.ensure`` for a Hub reference: the baked image -> this volume -> a Hugging Face cache
(adopted into the volume after verification, ``adopt.py``) -> download from the Hub.

A baked directory is a cache directory in our own layout, written at image build time by ``python -m
serve_app.cache pull`` (which publishes only after size and sha256 matched the Hub) and read-only afterwards. It is
trusted on its manifest plus one size check per file, never re-hashed at start: the image's layers are
content-addressed and verified by the container runtime when they are pulled, so a re-hash would cost seconds
per GB at every cold start and catch nothing new; the size check catches a manifest that does not describe the
files next to it. mtimes are not compared because image layers do not keep nanoseconds. ``verify`` (and so
``heal``, which runs when llama.cpp cannot load a file) does re-hash it, and a baked file that fails is skipped
for the rest of the process. Nothing here writes, locks or creates anything in a baked directory.

A Hugging Face cache is read only: ``<hub>/models--<owner>--<name>/refs/<revision>`` holds a commit,
``snapshots/<commit>/<file>`` links to ``blobs/<etag>``, and the etag is the file's sha256 for LFS files (every
GGUF) or its git blob sha1 otherwise. A link that leaves the repo's ``blobs`` directory is refused.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from pydantic import ValidationError

from serve_app.cache.integrity import contained_path, hash_file, regular_file_stat
from serve_app.cache.layout import Layout
from serve_app.cache.manifest import FileRecord, ManifestData, ref_key
from serve_app.cache.names import COMMIT_RE, glob_candidates, is_glob, names_hint, split_part_names
from serve_app.cache.results import CachedFile
from serve_app.config import ModelRef
from serve_app.errors import IntegrityError, InvalidModelReferenceError

log = logging.getLogger("serve_app.cache")

_SHA256_LEN, _SHA1_LEN = 64, 40


def known_in(data: ManifestData, ref: ModelRef) -> tuple[str, list[str]] | None:
    """(commit, filenames) that a manifest records for ``ref``, or None."""
    repo_id = ref.repo_id or ""
    rr = data.refs.get(ref_key(repo_id, ref.filename, ref.revision))
    if rr is not None:
        return rr.commit, rr.files
    if COMMIT_RE.fullmatch(ref.revision) and not is_glob(ref.filename):
        names = split_part_names(ref.filename)
        if all(Layout.file_key(repo_id, ref.revision, n) in data.files for n in names):
            return ref.revision, names
    return None


# ---- baked image ---------------------------------------------------------------------------------------------


class BakedImage:
    """A read-only cache directory inside the image, consulted before the volume."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self._rejected: set[str] = set()  # files that failed a re-hash: never used again by this process
        self._told: set[str] = set()  # references already logged as not baked

    def find(self, ref: ModelRef, *, rehash: bool = False) -> CachedFile | None:
        """The baked file(s) of ``ref`` when the manifest records them and every size matches (and, with
        ``rehash``, every sha256); else None."""
        data = self._manifest()
        known = known_in(data, ref) if data is not None else None
        if data is None or known is None:
            if data is not None:
                self._say_not_baked(data, ref)
            return None
        commit, names = known
        records: list[FileRecord] = []
        paths: list[str] = []
        for name in names:
            rec = data.files.get(Layout.file_key(ref.repo_id or "", commit, name))
            try:
                path = contained_path(self.root, rec.path) if rec is not None else None
                st = regular_file_stat(path) if path is not None else None
            except IntegrityError as exc:
                log.warning("baked model directory %s: %s", self.root, exc)
                return None
            if rec is None or path is None or st is None or path in self._rejected:
                return None
            if st.st_size != rec.size or (rehash and hash_file(path).sha256 != rec.sha256):
                log.warning("baked model directory %s does not hold %s as its manifest says; not using it",
                            self.root, name)
                self._rejected.add(path)
                return None
            records.append(rec)
            paths.append(path)
        first = records[0]
        return CachedFile(repo_id=first.repo_id, filename=first.filename, revision=ref.revision, commit=commit,
                          path=paths[0], size=sum(r.size for r in records), sha256=first.sha256,
                          verified_at=min(r.verified_at for r in records), parts=paths)

    def _say_not_baked(self, data: ManifestData, ref: ModelRef) -> None:
        """Once per reference: a config that names another model than the one baked is easy to miss."""
        key = ref_key(ref.repo_id or "", ref.filename, ref.revision)
        if data.refs and key not in self._told:
            self._told.add(key)
            baked = ", ".join(sorted(f"{r.repo_id}/{r.requested}@{r.revision}" for r in data.refs.values()))
            log.info("the baked model directory %s holds %s, not %s/%s@%s", self.root, baked, ref.repo_id,
                     ref.filename, ref.revision)

    def _manifest(self) -> ManifestData | None:
        try:
            with open(os.path.join(self.root, "manifest.json"), "rb") as f:
                raw = f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            return ManifestData.model_validate_json(raw)
        except ValidationError:
            log.warning("the baked model directory %s has an unreadable manifest; not using it", self.root)
            return None


# ---- Hugging Face cache --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HfFile:
    """One file of a Hugging Face cache snapshot: its name in the repo, its blob, and the hash the blob name records."""

    name: str
    blob: str
    size: int
    recorded_sha256: str | None
    recorded_git_sha1: str | None


@dataclass(frozen=True)
class HfSnapshot:
    cache_dir: str
    commit: str
    files: list[HfFile]


class HfCache:
    """A Hugging Face hub cache directory (``$HF_HUB_CACHE``; RunPod: ``/runpod-volume/huggingface-cache/hub``)."""

    def __init__(self, hub_dir: str) -> None:
        self.root = os.path.realpath(hub_dir)

    def find(self, ref: ModelRef) -> HfSnapshot | None:
        """The cached file(s) of ``ref``: every part present as a blob of the repo; else None."""
        owner, name = (ref.repo_id or "").split("/", 1)
        repo = os.path.join(self.root, f"models--{owner}--{name}")
        commit = ref.revision if COMMIT_RE.fullmatch(ref.revision) else self._ref_commit(repo, ref.revision)
        if commit is None:
            return None
        snapshot = os.path.join(repo, "snapshots", commit)
        if not os.path.isdir(snapshot):
            return None
        wanted = self._match(snapshot, ref.filename) if is_glob(ref.filename) else ref.filename
        if wanted is None:
            return None
        files = [self._file(repo, snapshot, part) for part in split_part_names(wanted)]
        if any(f is None for f in files):
            return None
        return HfSnapshot(self.root, commit, [f for f in files if f is not None])

    @staticmethod
    def _ref_commit(repo: str, revision: str) -> str | None:
        refs = os.path.join(repo, "refs")
        path = os.path.normpath(os.path.join(refs, revision))
        if os.path.commonpath([refs, path]) != refs:
            return None
        try:
            with open(path) as f:
                commit = f.read().strip()
        except OSError:
            return None
        return commit if COMMIT_RE.fullmatch(commit) else None

    @staticmethod
    def _match(snapshot: str, pattern: str) -> str | None:
        names = [os.path.relpath(os.path.join(d, n), snapshot).replace(os.sep, "/")
                 for d, _, files in os.walk(snapshot) for n in files]
        candidates = glob_candidates(names, pattern)
        if len(candidates) > 1:
            raise InvalidModelReferenceError(
                f"Pattern {pattern!r} matches {len(candidates)} cached files: {names_hint(candidates)}",
                param="filename")
        return candidates[0] if candidates else None

    @staticmethod
    def _file(repo: str, snapshot: str, name: str) -> HfFile | None:
        link = os.path.normpath(os.path.join(snapshot, name))
        if os.path.commonpath([snapshot, link]) != snapshot or not os.path.lexists(link):
            return None
        blobs = os.path.join(repo, "blobs")
        blob = os.path.realpath(link)
        if os.path.commonpath([blobs, blob]) != blobs or not os.path.isfile(blob):
            log.warning("ignoring %s in the Hugging Face cache: it does not lead to a blob of its repo", link)
            return None
        etag = os.path.basename(blob)
        sha256 = etag if len(etag) == _SHA256_LEN and _is_hex(etag) else None
        sha1 = etag if len(etag) == _SHA1_LEN and _is_hex(etag) else None
        return HfFile(name, blob, os.path.getsize(blob), sha256, sha1)


def _is_hex(s: str) -> bool:
    return all(c in "0123456789abcdef" for c in s)
