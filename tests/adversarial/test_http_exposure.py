"""The Ingress learns Serve's real HTTP host from the running controller, so its exposure warning (logged when
the API listens beyond loopback without API keys) rests on what Serve actually binds, not on a guess."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.ingress.exposure import exposure_warning, serve_http_host

pytestmark = pytest.mark.timeout(120)


def test_serve_http_host_is_read_from_the_running_controller(ray_session: str) -> None:
    found = asyncio.run(serve_http_host())
    assert found is not None
    host, location = found
    assert host == "127.0.0.1"  # what the session's serve.start() bound
    assert exposure_warning(host, location, 0) is None
    assert exposure_warning("0.0.0.0", location, 0) is not None
