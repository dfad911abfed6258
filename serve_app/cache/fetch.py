"""Fetch one file's body into a private staging file, verified against the Hub's size and sha256.

We do the HEAD (``get_hf_file_metadata``, retries off) and the GET (the ``huggingface_hub`` session) ourselves
instead of calling ``hf_hub_download``: in 2.4 that function retries the HEAD with its own backoff (~23 s when
the Hub is down), resumes the body up to 5 times with 1 s sleeps inside one call, never hashes the content
and reads its GET timeout from a module global (huggingface_hub's ``file_download.py``). Owning both
requests makes ``max_attempts``, the backoff and the deadline mean exactly what they say, turns a read stall
into a failed attempt, and lets us hash while receiving. A later attempt resumes with ``Range`` and keeps the
running hash; a body that fails verification is thrown away whole and fetched again.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx2
from huggingface_hub.utils import get_session, hf_raise_for_status

from serve_app.cache.hub import (
    HubClient,
    Location,
    RemoteFile,
    is_transient,
    retry_policy,
    short_reason,
    to_serve_error,
    unreachable,
)
from serve_app.cache.integrity import StreamHasher
from serve_app.config import DownloadConfig
from serve_app.errors import DownloadError, IntegrityError, ServeError
from serve_app.retry import Deadline, DeadlineExceeded, RetriesExhausted, retry

log = logging.getLogger("serve_app.cache")

_LOG_EVERY_S = 5.0


class _Corrupt(Exception):
    """The bytes (or the advertised size) disagree with the Hub's metadata; the attempt's data is discarded."""


class _Transient(Exception):
    """A server answer we can retry, such as a Content-Range that does not continue our partial file."""


# ---- progress ------------------------------------------------------------------------------------------------


class Progress(Protocol):
    def update(self, n: int) -> Any: ...
    def close(self) -> Any: ...


class LogProgress:
    """Periodic progress lines for logs that are not a terminal (Ray, RunPod)."""

    def __init__(self, what: str, total: int, initial: int = 0, interval_s: float = _LOG_EVERY_S) -> None:
        self._what, self._total, self._done = what, total, initial
        self._start_done, self._t0 = initial, time.monotonic()
        self._interval, self._last = interval_s, self._t0

    def update(self, n: int) -> None:
        self._done += n
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._emit(now)

    def _emit(self, now: float) -> None:
        rate = (self._done - self._start_done) / max(now - self._t0, 1e-6) / 1e6
        pct = 100.0 * self._done / self._total if self._total else 100.0
        log.info("downloading %s: %.0f%% (%d/%d MB, %.1f MB/s)", self._what, pct, self._done // 10**6,
                 self._total // 10**6, rate)

    def close(self) -> None:
        self._emit(time.monotonic())


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def make_progress(mode: str, what: str, total: int, initial: int) -> Progress:
    """``auto``: a bar on a terminal, log lines otherwise; or ``bar``, ``log``, ``none``."""
    if mode == "none":
        return _NoProgress()
    if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=what,
                    leave=False, file=sys.stderr)
    return LogProgress(what, total, initial)


# ---- staging file --------------------------------------------------------------------------------------------


class PartialFile:
    """The bytes received so far and their running hash, so the next attempt can resume."""

    def __init__(self, path: str, remote: RemoteFile) -> None:
        self.path = path
        self._remote = remote
        self._fh = open(path, "wb")
        self.written = 0
        self._hasher = self._new_hasher()

    def _new_hasher(self) -> StreamHasher:
        return StreamHasher(self._remote.size if self._remote.sha256 is None else None)

    def write(self, data: bytes) -> None:
        self._fh.write(data)
        self._hasher.update(data)
        self.written += len(data)

    def reset(self) -> None:
        self._fh.seek(0)
        self._fh.truncate()
        self.written = 0
        self._hasher = self._new_hasher()

    def verify(self) -> str:
        """The sha256 of what was received, if it is exactly what the Hub describes."""
        remote = self._remote
        if self.written != remote.size:
            raise _Corrupt(f"received {self.written} bytes, the Hub says {remote.size}")
        if remote.sha256 is not None and self._hasher.sha256 != remote.sha256:
            raise _Corrupt(f"sha256 {self._hasher.sha256[:12]}... does not match the Hub's {remote.sha256[:12]}...")
        if remote.sha256 is None and self._hasher.git_sha1 != remote.git_sha1:
            raise _Corrupt("git blob sha1 does not match the Hub's")
        return self._hasher.sha256

    def finish(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()

    def discard(self) -> None:
        self._fh.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


# ---- the attempt loop ----------------------------------------------------------------------------------------


@dataclass
class FetchJob:
    hub: HubClient
    repo_id: str
    commit: str
    remote: RemoteFile
    staging_dir: str
    config: DownloadConfig
    deadline: Deadline
    progress: str = "auto"
    free_bytes: int | None = None
    on_corrupt: Callable[[], None] | None = None  # counts verification failures (metrics)
    phase: str = field(default="hub", init=False)  # where the last attempt failed: "hub" (HEAD) or "body"

    @property
    def what(self) -> str:
        return f"{self.repo_id}/{self.remote.name}"

    def io_timeout(self) -> float:
        return self.deadline.io_timeout(self.config.read_timeout_s)


def download_verified(job: FetchJob) -> tuple[str, str]:
    """Fetch ``job.remote`` into the staging dir; returns (path, sha256) of a verified, fsynced file."""
    if job.free_bytes is not None and job.free_bytes < job.remote.size:
        raise DownloadError(
            f"Not enough space on the volume for {job.what}: need {job.remote.size} bytes, {job.free_bytes} free"
        )
    part = PartialFile(os.path.join(job.staging_dir, os.path.basename(job.remote.name)), job.remote)
    try:
        sha256 = _attempts(job, part)
        part.finish()
        return part.path, sha256
    except BaseException:
        part.discard()
        raise


def _attempts(job: FetchJob, part: PartialFile) -> str:
    """``max_attempts`` tries under one deadline; a corrupt body is discarded and fetched again from byte 0."""

    def attempt() -> str:
        try:
            return _attempt(job, part)
        except _Corrupt:
            part.reset()
            if job.on_corrupt is not None:
                job.on_corrupt()
            raise

    try:
        return retry(attempt, retry_policy(job.config), job.deadline, retryable=_retryable, what=job.what,
                     describe=_reason)
    except DeadlineExceeded as exc:
        raise DownloadError(f"Fetching {job.what} did not finish within {job.deadline.seconds:g} s") from exc
    except RetriesExhausted as exc:
        raise _final_error(job, exc.last, exc.attempts) from exc.last
    except ServeError:
        raise
    except Exception as exc:  # permanent: one request, a typed error at once
        raise to_serve_error(exc, endpoint=job.hub.endpoint, repo_id=job.repo_id, revision=job.commit,
                             filename=job.remote.name) from exc


def _attempt(job: FetchJob, part: PartialFile) -> str:
    job.phase = "hub"
    location = job.hub.locate(job.repo_id, job.remote.name, job.commit, timeout=job.io_timeout())
    _check_advertised(job, location)
    job.phase = "body"
    _receive(job, location, part)
    return part.verify()


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, _Corrupt | _Transient) or is_transient(exc)


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, _Corrupt | _Transient) else short_reason(exc)


def _final_error(job: FetchJob, last: BaseException, attempts: int) -> ServeError:
    tries = f"after {attempts} attempt{'s' if attempts != 1 else ''}"
    if isinstance(last, _Corrupt):
        return IntegrityError(f"{job.what} failed verification {tries}: {last}; nothing was published")
    if job.phase == "hub" and not isinstance(last, _Transient):
        return unreachable(job.hub.endpoint, f"{_reason(last)} {tries}")
    return DownloadError(f"Downloading {job.what} failed {tries} ({_reason(last)})")


def _check_advertised(job: FetchJob, location: Location) -> None:
    if location.size is not None and location.size != job.remote.size:
        raise _Corrupt(f"the Hub advertises {location.size} bytes but its metadata says {job.remote.size}")
    if location.commit is not None and location.commit != job.commit:
        raise _Transient(f"the Hub resolved commit {location.commit[:12]} instead of {job.commit[:12]}")


def _receive(job: FetchJob, location: Location, part: PartialFile) -> None:
    if part.written == job.remote.size:
        return  # an earlier attempt received every byte before failing: verification decides
    headers = {**location.headers, "Accept-Encoding": "identity"}
    if part.written:
        headers["Range"] = f"bytes={part.written}-"
    timeout = httpx2.Timeout(job.io_timeout())
    with get_session().stream("GET", location.url, headers=headers, timeout=timeout, follow_redirects=True) as resp:
        if resp.status_code == 416 and part.written:
            offset = part.written
            part.reset()
            raise _Transient(f"the server refused to resume at byte {offset}")
        if resp.status_code >= 400:
            resp.read()  # the error mapper reads the body
            hf_raise_for_status(resp)
        _align_resume(resp, part)
        progress = make_progress(job.progress, job.what, job.remote.size, part.written)
        try:
            # Unchunked: data is written as it arrives, so a resumed attempt loses nothing already received.
            for chunk in resp.iter_bytes():
                part.write(chunk)
                progress.update(len(chunk))
                if part.written > job.remote.size:
                    raise _Corrupt(f"the server sent more than the expected {job.remote.size} bytes")
                if job.deadline.remaining() <= 0:
                    raise DeadlineExceeded(f"the {job.deadline.seconds:g} s deadline passed")
        finally:
            progress.close()


def _align_resume(resp: httpx2.Response, part: PartialFile) -> None:
    if resp.status_code == 206:
        content_range = resp.headers.get("Content-Range", "")
        start = content_range.removeprefix("bytes ").split("-", 1)[0]
        if not part.written or start != str(part.written):
            offset = part.written
            part.reset()
            raise _Transient(f"unexpected Content-Range {content_range!r} for offset {offset}")
    elif part.written:
        part.reset()  # the server ignored Range: start over from byte 0
