"""Hub metadata: commit resolution, LFS size/sha256, file selection, and the mapping of Hub failures to our errors.

The endpoint and token come from ``serve_app.settings.Settings`` when a ``HubClient`` is built, and are passed to
``huggingface_hub`` explicitly, because that library only reads the environment at import. The token is never
put in a message or a log line, and ``token=False`` is passed when ``HF_TOKEN`` is unset so the library never
falls back to a token file (or refreshes an OAuth token over the network). No call here retries: callers go
through ``serve_app.retry`` with ``is_transient``; every other failure is permanent and maps to a typed error
that says retrying will not help.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import httpx2
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import build_hf_headers

from serve_app.cache.names import COMMIT_RE, glob_candidates, is_glob, names_hint, split_part_names
from serve_app.config import DownloadConfig
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
    exception_line,
)
from serve_app.retry import RetryPolicy
from serve_app.settings import Settings

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
    files: dict[str, RemoteFile] = field(default_factory=dict)

    def gguf_names(self) -> list[str]:
        return sorted(n for n in self.files if n.endswith(".gguf"))


def file_not_found(listing: RepoListing, name: str) -> RemoteFileNotFoundError:
    return RemoteFileNotFoundError(
        f"File {name!r} was not found in {listing.repo_id}@{listing.revision}; "
        f".gguf files there: {names_hint(listing.gguf_names())}",
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
            f"{names_hint(missing)}",
            param="filename",
        )
    return [listing.files[p] for p in parts]


def _match_pattern(listing: RepoListing, pattern: str) -> str:
    candidates = glob_candidates(listing.files, pattern)
    if not candidates:
        raise RemoteFileNotFoundError(
            f"No file in {listing.repo_id}@{listing.revision} matches {pattern!r}; "
            f".gguf files there: {names_hint(listing.gguf_names())}",
            param="filename",
        )
    if len(candidates) > 1:
        raise InvalidModelReferenceError(
            f"Pattern {pattern!r} matches {len(candidates)} files in {listing.repo_id}: "
            f"{names_hint(candidates)}; use a more specific pattern or the exact filename",
            param="filename",
        )
    return candidates[0]


# ---- network -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """Where to GET a file's body, with the headers to send (no ``authorization`` off the Hub's origin)."""

    url: str
    size: int | None
    commit: str | None
    headers: dict[str, str]


class HubClient:
    """Metadata calls against the endpoint and token of ``settings`` (the environment when built)."""

    def __init__(self, settings: Settings | None = None) -> None:
        settings = settings or Settings()
        self.endpoint = settings.endpoint()
        self._token: str | bool = settings.token() or False

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
        if info.gated and not self.has_token:
            raise GatedRepoError(
                f"Repository {repo_id!r} is gated: accept its terms on the Hub and set HF_TOKEN", param="repo_id"
            )
        return RepoListing(repo_id, revision, commit, files)

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
        return Location(target, meta.size, meta.commit_hash, headers)


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
    """A Hub failure in a few words: its HTTP status when it has one, else ``errors.exception_line``."""
    status = http_status(exc)
    return f"HTTP {status}" if status is not None else exception_line(exc)


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
    return _by_status(exc, endpoint=endpoint, repo_id=repo_id, revision=revision, filename=filename)


def _by_status(exc: BaseException, *, endpoint: str, repo_id: str, revision: str, filename: str | None) -> ServeError:
    """Failures the library did not type (a mirror or a CDN answering without ``X-Error-Code``)."""
    status = http_status(exc)
    if status in (401, 403):
        return GatedRepoError(f"The Hub denied access to {repo_id!r} (HTTP {status}); check HF_TOKEN")
    if status in _RETRY_STATUS or isinstance(exc, httpx2.TransportError | ConnectionError | TimeoutError):
        return unreachable(endpoint, short_reason(exc))
    if status == 404:
        if filename:
            return RemoteFileNotFoundError(
                f"File {filename!r} was not found in {repo_id}@{revision} (HTTP 404)", param="filename")
        return RepoNotFoundError(f"{repo_id}@{revision} was not found on the Hub at {endpoint} (HTTP 404)",
                                 param="repo_id")
    if status is not None and 400 <= status < 500:
        # A refusal that another attempt would only repeat: permanent, so not retryable.
        return ModelSourceError(f"The Hub refused the request for {repo_id}@{revision} (HTTP {status})")
    return DownloadError(f"Hub request for {repo_id}@{revision} failed ({short_reason(exc)})")


def retry_policy(config: DownloadConfig) -> RetryPolicy:
    return RetryPolicy(attempts=config.max_attempts, backoff_base_s=config.backoff_base_s,
                       backoff_max_s=config.backoff_max_s)
