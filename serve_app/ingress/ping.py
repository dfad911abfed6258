"""``/ping``, the health probe of RunPod's load-balancing endpoints: 200 ready, 204 while the model is loading
(or its replica restarting), 503 when it failed or the server is shutting down. Pure, so the RunPod worker's
own health listener (a ``PORT_HEALTH`` apart from ``PORT``) answers by the same rule."""

from __future__ import annotations

PING_STATUS: dict[str, int] = {"ready": 200, "loading": 204, "unavailable": 204, "failed": 503,
                               "shutting_down": 503}


def ping_status(state: str) -> int:
    """The HTTP status of ``/ping`` for a ``/ready`` status; anything unknown is a failure."""
    return PING_STATUS.get(state, 503)
