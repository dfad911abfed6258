"""Bounded retries for network calls: attempts, exponential backoff, one overall deadline.

Every loop that talks to the Hub goes through ``retry``: at most ``attempts`` tries, a sleep of
``backoff_base_s * 2**(n-1)`` (capped at ``backoff_max_s``) after the n-th failure, and never a sleep that would
end past the deadline. Which failures are worth another try is the caller's ``retryable`` predicate; any other
exception is re-raised at once, so a permanent error costs exactly one request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger("serve_app.retry")

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry. The overall time limit is not part of it: that is the ``Deadline``
    the caller passes to ``retry``, shared by everything done for one file (``DownloadConfig.timeout_s``)."""

    attempts: int = 3
    backoff_base_s: float = 1.0
    backoff_max_s: float = 30.0

    def delay(self, attempt: int) -> float:
        """The sleep after failed attempt number ``attempt`` (1-based)."""
        return min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))


class DeadlineExceeded(TimeoutError):
    """The overall deadline passed before the work finished; never retried."""


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self._end - time.monotonic()

    def io_timeout(self, cap: float) -> float:
        """A per-request timeout that ends no later than the deadline (raises once it has passed)."""
        remaining = self.remaining()
        if remaining <= 0:
            raise DeadlineExceeded(f"the {self.seconds:g} s deadline passed")
        return min(cap, remaining)


class RetriesExhausted(Exception):
    """Every allowed attempt failed with a retryable error (``last``), or the deadline left no room for another."""

    def __init__(self, last: BaseException, attempts: int) -> None:
        super().__init__(f"{attempts} attempt{'s' if attempts != 1 else ''} failed: {last}")
        self.last = last
        self.attempts = attempts


def retry(
    call: Callable[[], T],
    policy: RetryPolicy,
    deadline: Deadline,
    *,
    retryable: Callable[[BaseException], bool],
    what: str,
    describe: Callable[[BaseException], str] = lambda exc: type(exc).__name__,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``call()`` until it returns. A non-retryable exception (or ``DeadlineExceeded``) propagates unchanged;
    running out of attempts or time raises ``RetriesExhausted`` from the last failure."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except Exception as exc:
            if isinstance(exc, DeadlineExceeded) or not retryable(exc):
                raise
            delay = policy.delay(attempt)
            if attempt == policy.attempts or delay >= deadline.remaining():
                log.warning("%s: attempt %d/%d failed (%s)", what, attempt, policy.attempts, describe(exc))
                raise RetriesExhausted(exc, attempt) from exc
            log.warning("%s: attempt %d/%d failed (%s); retrying in %.2g s", what, attempt, policy.attempts,
                        describe(exc), delay)
            sleep(delay)
    raise ValueError("RetryPolicy.attempts must be at least 1")
