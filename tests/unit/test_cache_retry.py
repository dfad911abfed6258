"""The one retry helper every Hub loop uses: at most ``attempts`` calls, exponential backoff capped at
``backoff_max_s``, no sleep past the overall deadline, and a non-retryable error (or the deadline) raised after
exactly one call.
"""

from __future__ import annotations

import pytest

from serve_app.retry import Deadline, DeadlineExceeded, RetriesExhausted, RetryPolicy, retry


class Flaky:
    def __init__(self, failures: list[BaseException], result: str = "ok") -> None:
        self.failures = failures
        self.result = result
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return self.result


def transient(exc: BaseException) -> bool:
    return isinstance(exc, ConnectionError)


def test_transient_failures_are_retried_with_exponential_backoff() -> None:
    sleeps: list[float] = []
    call = Flaky([ConnectionError("a"), ConnectionError("b")])
    policy = RetryPolicy(attempts=3, backoff_base_s=1.0, backoff_max_s=1.5)
    got = retry(call, policy, Deadline(300), retryable=transient, what="x", sleep=sleeps.append)
    assert got == "ok" and call.calls == 3 and sleeps == [1.0, 1.5]


def test_attempts_are_bounded_and_the_last_failure_is_kept() -> None:
    call = Flaky([ConnectionError(str(i)) for i in range(5)])
    with pytest.raises(RetriesExhausted) as info:
        retry(call, RetryPolicy(attempts=3, backoff_base_s=0), Deadline(300), retryable=transient, what="x",
              sleep=lambda s: None)
    assert call.calls == 3 and info.value.attempts == 3 and str(info.value.last) == "2"


def test_a_permanent_error_costs_one_call() -> None:
    call = Flaky([ValueError("permanent"), ConnectionError("never reached")])
    with pytest.raises(ValueError, match="permanent"):
        retry(call, RetryPolicy(attempts=5), Deadline(300), retryable=transient, what="x", sleep=lambda s: None)
    assert call.calls == 1


def test_no_sleep_ends_past_the_deadline() -> None:
    sleeps: list[float] = []
    call = Flaky([ConnectionError("a"), ConnectionError("b")])
    with pytest.raises(RetriesExhausted) as info:
        retry(call, RetryPolicy(attempts=5, backoff_base_s=10), Deadline(5), retryable=transient, what="x",
              sleep=sleeps.append)
    assert call.calls == 1 and sleeps == [] and info.value.attempts == 1


def test_deadline_exceeded_is_never_retried() -> None:
    deadline = Deadline(0)
    with pytest.raises(DeadlineExceeded):
        deadline.io_timeout(30)
    call = Flaky([DeadlineExceeded("late")])
    with pytest.raises(DeadlineExceeded):
        retry(call, RetryPolicy(attempts=5), Deadline(300), retryable=lambda e: True, what="x", sleep=lambda s: None)
    assert call.calls == 1
    assert Deadline(100).io_timeout(30) == 30
