"""A request that has not started is resent when its replica is gone, a bounded number of times, and never when
the failure is the request's own; a stream has started only once the client was sent something visible; every
abandoned stream attempt is cancelled so it cannot hold a slot."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError

from serve_app.errors import InvalidRequestError
from serve_app.ingress import failover
from serve_app.ingress.failover import ATTEMPTS, call_with_failover, open_stream, replica_gone
from serve_app.protocol import Delta


@pytest.fixture(autouse=True)
def _no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(failover, "PAUSE_S", 0.0)


class FakeStream:
    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome
        self.cancelled = False

    async def __anext__(self) -> Any:
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self) -> None:
        self.cancelled = True


def test_replica_loss_is_recognised_and_request_errors_are_not() -> None:
    assert replica_gone(ActorDiedError())
    assert replica_gone(ActorUnavailableError("gone", None))
    assert not replica_gone(InvalidRequestError("bad"))
    assert not replica_gone(ValueError("bug"))


def test_a_call_is_resent_after_replica_loss() -> None:
    outcomes: list[Any] = [ActorDiedError(), "done"]

    async def call() -> Any:
        out = outcomes.pop(0)
        if isinstance(out, BaseException):
            raise out
        return out

    assert asyncio.run(call_with_failover(call, "r1")) == "done"


def test_resends_are_bounded_and_request_errors_are_not_resent() -> None:
    calls = 0

    async def dead() -> None:
        nonlocal calls
        calls += 1
        raise ActorDiedError()

    with pytest.raises(ActorDiedError):
        asyncio.run(call_with_failover(dead, "r2"))
    assert calls == ATTEMPTS

    calls = 0

    async def bad() -> None:
        nonlocal calls
        calls += 1
        raise InvalidRequestError("bad")

    with pytest.raises(InvalidRequestError):
        asyncio.run(call_with_failover(bad, "r3"))
    assert calls == 1


def test_a_stream_is_reopened_before_its_first_event_and_failed_attempts_are_cancelled() -> None:
    first = Delta("hi", 1)
    streams = [FakeStream(ActorUnavailableError("gone", None)), FakeStream(first)]
    started = list(streams)
    gen, ev = asyncio.run(open_stream(lambda: streams.pop(0), "r4"))
    assert ev is first and gen is started[1]
    assert started[0].cancelled and not started[1].cancelled


class ScriptedStream(FakeStream):
    """Yields its events in order; an exception among them is raised there."""

    def __init__(self, *events: Any) -> None:
        super().__init__(None)
        self.events = list(events)

    async def __anext__(self) -> Any:
        ev = self.events.pop(0)
        if isinstance(ev, BaseException):
            raise ev
        return ev


def test_tokens_that_show_nothing_yet_do_not_start_a_stream() -> None:
    # A token that is part of a character (or held back for a stop string) reaches the client as nothing: losing
    # the replica then still costs only a resend.
    lost = ScriptedStream(Delta("", 1), ActorUnavailableError("gone", None))
    ok = ScriptedStream(Delta("", 1), Delta("", 1), Delta("é", 1))
    streams = [lost, ok]
    gen, ev = asyncio.run(open_stream(lambda: streams.pop(0), "r5"))
    assert gen is ok and lost.cancelled and not ok.cancelled
    assert isinstance(ev, Delta) and ev.text == "é" and ev.n_tokens == 3
