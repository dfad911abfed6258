"""The exposure check warns exactly when Serve's HTTP proxy listens beyond loopback and no API key is set."""

from __future__ import annotations

import pytest

from serve_app.ingress.exposure import exposure_warning, is_loopback


@pytest.mark.parametrize("host", ["127.0.0.1", "127.5.5.5", "localhost", "LOCALHOST", "::1", "[::1]"])
def test_loopback_hosts_never_warn(host: str) -> None:
    assert is_loopback(host)
    assert exposure_warning(host, "HeadOnly", 0) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.7", "192.168.1.2", "my-node.internal", "2001:db8::1"])
def test_beyond_loopback_without_keys_warns(host: str) -> None:
    msg = exposure_warning(host, "EveryNode", 0)
    assert msg is not None and host in msg and "API key" in msg
    assert exposure_warning(host, "DeploymentMode.HeadOnly", 0) is not None


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.7"])
def test_api_keys_silence_the_warning(host: str) -> None:
    assert exposure_warning(host, "EveryNode", 1) is None


def test_no_http_proxy_never_warns() -> None:
    assert exposure_warning(None, "EveryNode", 0) is None
    assert exposure_warning("0.0.0.0", "NoServer", 0) is None
    assert exposure_warning("0.0.0.0", "DeploymentMode.NoServer", 0) is None
    assert exposure_warning("0.0.0.0", "Disabled", 0) is None
