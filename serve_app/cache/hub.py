"""Hub metadata: reference validation, commit resolution, LFS size/sha256, quant patterns, split parts.

Environment is read at call time (``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``) and passed explicitly,
because ``huggingface_hub`` only reads it at import. The token is never put in a message or a log line, and
``token=False`` is passed when ``HF_TOKEN`` is unset so the library never falls back to a token file (or
refreshes an OAuth token over the network). No call here retries: ``store`` owns retries and deadlines.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import httpx2
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import build_hf_headers

from serve_app.errors import (
    DownloadError,
    GatedRepoError,
    HubUnreachableError,
    InvalidModelReferenceError,
    ModelSourceError,
    NotCachedError,
    RemoteFileNotFoundError,
    RepoNotFoundError,
    RevisionNotFoundError,
    ServeError,
)

DEFAULT_ENDPOINT = "https://huggingface.co"
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# Hub rules: alnum plus - _ . ; no leading/trailing - or . ; no "--" or ".."; 96 chars per component.
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_RE = re.compile(rf"^{_NAME}/{_NAME}$")
SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.gguf$")
_GLOB_CHARS = frozenset("*?[")
_TRUE = frozenset({"1", "true", "yes", "on"})


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def offline_mode() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE


def is_glob(name: str) -> bool:
    return any(c in _GLOB_CHARS for c in name)


# ---- validation ----------------------------------------------------------------------------------------------


def validate_repo_id(repo_id: str) -> str:
    if not _REPO_RE.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id:
        raise InvalidModelReferenceError(
            f"Invalid repo id {repo_id!r}: expected 'owner/name' using letters, digits, '-', '_' and '.'",
            param="repo_id",
        )
    return repo_id


def validate_filename(name: str, *, allow_glob: bool = True) -> str:
    """A repo-relative path that cannot name anything outside its directory once joined."""
    bad = (
        not name
        or len(name) > 1024
        or name.startswith("/")
        or "\\" in name
        or any(ord(c) < 32 for c in name)
        or any(seg in ("", ".", "..") for seg in name.split("/"))
        or (not allow_glob and is_glob(name))
    )
    if bad:
        raise InvalidModelReferenceError(
            f"Invalid filename {name!r}: use a relative path inside the repo (no '..', no leading '/', no '\\')",
            param="filename",
        )
    return name


def validate_revision(revision: str) -> str:
    if not revision or len(revision) > 256 or ".." in revision or any(ord(c) < 32 for c in revision):
        raise InvalidModelReferenceError(f"Invalid revision {revision!r}", param="revision")
    return revision


def split_part_names(name: str) -> list[str]:
    """All part names of a split GGUF (``x-00001-of-00003.gguf``), first part first; ``[name]`` otherwise."""
    m = SPLIT_RE.match(name)
    if not m:
        return [name]
    total = int(m.group("total"))
    if total < 1 or not 1 <= int(m.group("index")) <= total:
        raise InvalidModelReferenceError(f"Invalid split GGUF part name {name!r}", param="filename")
    return [f"{m.group('stem')}-{i:05d}-of-{total:05d}.gguf" for i in range(1, total + 1)]


# ---- listing and selection -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteFile:
    """One file of a commit, with what we verify it against (LFS sha256, or the git blob sha1 otherwise)."""

    name: str
    size: int
    sha256: str | None
    git_sha1: str | None = None


@dataclass(frozen=True)
class RepoListing:
    repo_id: str
    revision: str
    commit: str
    gated: bool
    files: dict[str, RemoteFile] = field(default_factory=dict)

    def gguf_names(self) -> list[str]:
        return sorted(n for n in self.files if n.endswith(".gguf"))


def _names_hint(names: list[str], limit: int = 20) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def file_not_found(listing: RepoListing, name: str) -> RemoteFileNotFoundError:
    return RemoteFileNotFoundError(
        f"File {name!r} was not found in {listing.repo_id}@{listing.revision}; "
        f".gguf files there: {_names_hint(listing.gguf_names())}",
        param="filename",
    )


def select_files(listing: RepoListing, requested: str) -> list[RemoteFile]:
    """The file(s) a filename, quant pattern or split part names: every part of a split GGUF, first part first."""
    name = _match_pattern(listing, requested) if is_glob(requested) else requested
    if name not in listing.files:
        raise file_not_found(listing, name)
    parts = split_part_names(name)
    missing = [p for p in parts if p not in listing.files]
    if missing:
        raise RemoteFileNotFoundError(
            f"Split GGUF {parts[0]!r} in {listing.repo_id}@{listing.revision} is incomplete; missing: "
            f"{_names_hint(missing)}",
            param="filename",
        )
    return [listing.files[p] for p in parts]


def _match_pattern(listing: RepoListing, pattern: str) -> str:
    matches = sorted(n for n in listing.files if fnmatch.fnmatchcase(n, pattern))
    # The parts of one split GGUF count as one candidate.
    candidates = sorted({split_part_names(n)[0] if SPLIT_RE.match(n) else n for n in matches})
    if not candidates:
        raise RemoteFileNotFoundError(
            f"No file in {listing.repo_id}@{listing.revision} matches {pattern!r}; "
            f".gguf files there: {_names_hint(listing.gguf_names())}",
            param="filename",
        )
    if len(candidates) > 1:
        raise InvalidModelReferenceError(
            f"Pattern {pattern!r} matches {len(candidates)} files in {listing.repo_id}: "
            f"{_names_hint(candidates)}; use a more specific pattern or the exact filename",
            param="filename",
        )
    return candidates[0]


# ---- network -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """Where to GET a file's body, with the headers to send (no ``authorization`` off the Hub's origin)."""

    url: str
    size: int | None
    etag: str | None
    commit: str | None
    headers: dict[str, str]


class HubClient:
    """Metadata calls against the endpoint and token in the environment at construction time."""

    def __init__(self) -> None:
        self.endpoint = hub_endpoint()
        self._token: str | bool = hub_token() or False

    @property
    def has_token(self) -> bool:
        return bool(self._token)

    def listing(self, repo_id: str, revision: str, *, timeout: float) -> RepoListing:
        api = HfApi(endpoint=self.endpoint, token=self._token, library_name="gguf-serve")
        info = api.model_info(repo_id, revision=revision, files_metadata=True, timeout=timeout, token=self._token)
        commit = info.sha or ""
        if not COMMIT_RE.fullmatch(commit):
            raise ModelSourceError(f"The Hub at {self.endpoint} gave no commit for {repo_id}@{revision}")
        files: dict[str, RemoteFile] = {}
        for sib in info.siblings or []:
            if sib.lfs is not None:
                files[sib.rfilename] = RemoteFile(sib.rfilename, sib.lfs.size, sib.lfs.sha256)
            elif sib.size is not None and sib.blob_id:
                files[sib.rfilename] = RemoteFile(sib.rfilename, sib.size, None, sib.blob_id)
        gated = bool(info.gated)
        if gated and not self.has_token:
            raise GatedRepoError(
                f"Repository {repo_id!r} is gated: accept its terms on the Hub and set HF_TOKEN", param="repo_id"
            )
        return RepoListing(repo_id, revision, commit, gated, files)

    def locate(self, repo_id: str, filename: str, commit: str, *, timeout: float) -> Location:
        url = hf_hub_url(repo_id, filename, revision=commit, endpoint=self.endpoint)
        meta = get_hf_file_metadata(
            url, token=self._token, timeout=timeout, endpoint=self.endpoint, retry_on_errors=False
        )
        target = urljoin(url, meta.location)
        headers = build_hf_headers(token=self._token, library_name="gguf-serve")
        if _origin(target) != _origin(url):
            # Signed CDN URLs must not receive the Hub token.
            headers.pop("authorization", None)
        return Location(target, meta.size, meta.etag, meta.commit_hash, headers)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


# ---- errors --------------------------------------------------------------------------------------------------

_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def is_transient(exc: BaseException) -> bool:
    """Network trouble or a server-side hiccup that another attempt may not hit."""
    if isinstance(exc, ServeError):
        return exc.retryable
    if isinstance(exc, httpx2.TransportError | ConnectionError | TimeoutError):
        return not isinstance(exc, hf_errors.OfflineModeIsEnabled)
    if isinstance(exc, hf_errors.HfHubHTTPError) and not isinstance(exc, hf_errors.RepositoryNotFoundError):
        return http_status(exc) in _RETRY_STATUS
    return False


def unreachable(endpoint: str, reason: str) -> HubUnreachableError:
    return HubUnreachableError(
        f"The Hub at {endpoint} is unreachable ({reason}); set HF_ENDPOINT to use a mirror, "
        "or HF_HUB_OFFLINE=1 to serve a cached file"
    )


def short_reason(exc: BaseException) -> str:
    status = http_status(exc)
    if status is not None:
        return f"HTTP {status}"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


def to_serve_error(
    exc: BaseException, *, endpoint: str, repo_id: str, revision: str, listing: RepoListing | None = None,
    filename: str | None = None,
) -> ServeError:
    """Map a ``huggingface_hub``/``httpx2`` exception to our typed errors, with a one-line client message."""
    if isinstance(exc, ServeError):
        return exc
    if isinstance(exc, hf_errors.GatedRepoError):
        return GatedRepoError(
            f"Repository {repo_id!r} is gated: accept its terms on the Hub and set HF_TOKEN (access denied)",
            param="repo_id",
        )
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return RepoNotFoundError(
            f"Repository {repo_id!r} was not found on the Hub at {endpoint} (if it is private, set HF_TOKEN)",
            param="repo_id",
        )
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return RevisionNotFoundError(
            f"Revision {revision!r} of {repo_id!r} was not found on the Hub at {endpoint}", param="revision"
        )
    if isinstance(exc, hf_errors.RemoteEntryNotFoundError):
        if listing is not None and filename:
            return file_not_found(listing, filename)
        return RemoteFileNotFoundError(f"File {filename!r} was not found in {repo_id}@{revision}", param="filename")
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return NotCachedError(f"{repo_id}/{filename or ''} is not cached and offline mode forbids downloading")
    status = http_status(exc)
    if status in (401, 403):
        return GatedRepoError(f"The Hub denied access to {repo_id!r} (HTTP {status}); check HF_TOKEN")
    if status in _RETRY_STATUS or isinstance(exc, httpx2.TransportError | ConnectionError | TimeoutError):
        return unreachable(endpoint, short_reason(exc))
    return DownloadError(f"Hub request for {repo_id}@{revision} failed ({short_reason(exc)})")
