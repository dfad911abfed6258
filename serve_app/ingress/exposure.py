"""One clear warning when the service answers beyond loopback without API keys.

Serve's HTTP proxy, not the Ingress, owns the listening socket, so the Ingress asks Serve's controller for its HTTP
options (the same call Serve's own replicas make at start; no public API exposes them to a replica). The decision
itself (``exposure_warning``) is a pure function.
"""

from __future__ import annotations

import ipaddress
import logging

from serve_app import ray_private

log = logging.getLogger("ray.serve")

LOOKUP_TIMEOUT_S = 5.0
NO_HTTP = {"NoServer", "Disabled"}


def is_loopback(host: str) -> bool:
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def exposure_warning(host: str | None, location: str | None, n_api_keys: int) -> str | None:
    """The warning to log for Serve's HTTP ``host`` and proxy ``location``, or None. A ``host`` of None means
    Serve runs no HTTP proxy; 0.0.0.0, ::, a LAN address or a host name all count as beyond loopback."""
    if n_api_keys or host is None or (location or "").split(".")[-1] in NO_HTTP or is_loopback(host):
        return None
    return (f"the OpenAI API is served on {host} (beyond loopback) with no API key: anyone who can reach that "
            "address can use the model. Set server.api_keys or GGUF_SERVE_API_KEYS, or bind Serve's HTTP host to "
            "127.0.0.1.")


async def serve_http_host() -> tuple[str | None, str | None] | None:
    """(host, proxy location) of Serve's HTTP options, or None when the controller cannot be asked."""
    try:
        return await ray_private.serve_http_options(LOOKUP_TIMEOUT_S)
    except Exception as e:  # no Serve controller, or its API changed: say so, never fail the replica
        log.info("could not read Serve's HTTP options (%s); skipping the exposure check", type(e).__name__)
        return None


async def warn_if_exposed(n_api_keys: int) -> None:
    found = await serve_http_host()
    msg = exposure_warning(*found, n_api_keys) if found is not None else None
    if msg:
        log.warning(msg)
