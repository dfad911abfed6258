"""``GET /metrics`` on the ingress port: the Prometheus text of the Ray node this Ingress replica runs on.

Ray exports every metric of a node (ours, ``ray_gguf_*``, next to ``ray_serve_*`` and Ray's own) from that
node's metrics agent, on ``--metrics-export-port`` (a random port when not set, as under ``serve run``). Users and
scrapers look for ``/metrics`` where they send requests, as with llama-server and vLLM, so the Ingress relays the
local node's export. Only the local node: on a cluster, Prometheus scrapes every node's export port itself (see
the README's scrape config); this route covers one machine and the head.

Where the export is: ``ray.nodes()`` (public API) lists each node's address and ``MetricsExportPort``; this
replica's node is ``ray.get_runtime_context().get_node_id()``. Found once, then cached for the process.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from serve_app.errors import NotReadyError

log = logging.getLogger("ray.serve")

SCRAPE_TIMEOUT_S = 10.0
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def _local_export_url() -> str:
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            port = node.get("MetricsExportPort")
            if not port:
                break
            return f"http://{node['NodeManagerAddress']}:{port}/metrics"
    raise NotReadyError("this Ray node exports no metrics (started with metrics disabled?)")


class NodeMetrics:
    def __init__(self) -> None:
        self._url: str | None = None

    async def url(self) -> str:
        if self._url is None:
            # ray.nodes() is a blocking call to the cluster's GCS: off the event loop that relays streams.
            self._url = await asyncio.to_thread(_local_export_url)
        return self._url

    async def scrape(self) -> bytes:
        url = await self.url()
        try:
            timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as resp:
                if resp.status != 200:
                    raise NotReadyError(f"the node's metrics export answered {resp.status}")
                return await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("scraping the node's metrics at %s failed: %s", url, e)
            raise NotReadyError("the node's metrics export is not reachable; retry") from None


_node_metrics = NodeMetrics()


async def scrape_node_metrics() -> bytes:
    """The local node's Prometheus text (one export lookup per process)."""
    return await _node_metrics.scrape()
