"""What the model cache answers: ``CachedFile`` (a verified model), ``CacheStatus`` (present / missing / corrupt),
and the counters the ModelCache deployment turns into metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from serve_app.cache.layout import Layout
from serve_app.cache.manifest import FileRecord

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
    # Missing here but held by a Hugging Face cache (unverified until adopted, as ``ensure`` or ``adopt`` does).
    adoptable_from: str | None = None


@dataclass
class StoreStats:
    """Monotonic counters for metrics (read by the ModelCache deployment)."""

    hits: int = 0
    misses: int = 0
    downloads: int = 0
    download_bytes: int = 0
    verify_failures: int = 0


def cached_from_records(layout: Layout, revision: str, records: list[FileRecord]) -> CachedFile:
    first = records[0]
    parts = [layout.display_path(r.path) for r in records]
    return CachedFile(
        repo_id=first.repo_id, filename=first.filename, revision=revision, commit=first.commit, path=parts[0],
        size=sum(r.size for r in records), sha256=first.sha256,
        verified_at=min(r.verified_at for r in records), parts=parts,
    )


def local_cached(parts: list[str], records: list[FileRecord]) -> CachedFile:
    return CachedFile(
        repo_id=None, filename=parts[0], revision="local", commit=None, path=parts[0],
        size=sum(r.size for r in records), sha256=records[0].sha256,
        verified_at=min(r.verified_at for r in records), parts=parts,
    )


def present(cached: CachedFile) -> CacheStatus:
    return CacheStatus(state="present", **cached.model_dump())
