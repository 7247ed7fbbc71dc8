"""The metric families in Ray's metrics API, and the cluster's export read back for ``/metrics``.

Each process records through ``ray.util.metrics``; Ray's agent on each node exports the series
of that node's processes at the node's metrics export port (8080 under KubeRay, random under
``serve run``) as ``ray_<name>``. Prometheus scrapes that port on every node; the ingress reads
it on every alive node at scrape time, so that ``GET /metrics`` shows the whole application
whether its replicas share one machine or are spread over a cluster.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

import httpx
import ray
from ray.util import metrics as ray_metrics

from ourvidz_serve.observability.metrics import Family, Instrument, Kind, Metrics

logger = logging.getLogger(__name__)

EXPORT_TIMEOUT_S = 2.0


class _RayInstrument:
    def __init__(self, family: Family) -> None:
        self._kind = family.kind
        self._metric: ray_metrics.Counter | ray_metrics.Histogram | ray_metrics.Gauge
        if family.kind is Kind.COUNTER:
            self._metric = ray_metrics.Counter(
                family.name, description=family.help, tag_keys=family.labels
            )
        elif family.kind is Kind.HISTOGRAM:
            self._metric = ray_metrics.Histogram(
                family.name,
                description=family.help,
                boundaries=list(family.buckets),
                tag_keys=family.labels,
            )
        else:
            self._metric = ray_metrics.Gauge(
                family.name, description=family.help, tag_keys=family.labels
            )

    def record(self, labels: Mapping[str, str], value: float) -> None:
        tags = dict(labels)
        if isinstance(self._metric, ray_metrics.Counter):
            if value > 0:  # Ray refuses a zero increment
                self._metric.inc(value, tags=tags)
        elif isinstance(self._metric, ray_metrics.Histogram):
            self._metric.observe(value, tags=tags)
        else:
            self._metric.set(value, tags=tags)


class RayBackend:
    def instrument(self, family: Family) -> Instrument:
        return _RayInstrument(family)


def ray_metrics_recorder() -> Metrics:
    """The recorder of a process in a Ray cluster (every deployment's replicas)."""
    return Metrics(RayBackend())


def node_export_urls() -> list[str]:
    """Prometheus URLs of the metrics export of every alive node of the cluster."""
    return [
        f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for node in ray.nodes()
        if node["Alive"]
    ]


class RayClusterFeed:
    """Reads Ray's metrics export of every alive node (every replica, every family).

    The node list is read at each scrape, so replicas on nodes the autoscaler added count as
    soon as their node is up. A node that does not answer in time is left out and logged: a
    scrape shows what it can rather than failing.
    """

    def __init__(self, urls: Callable[[], list[str]] = node_export_urls) -> None:
        self._urls = urls

    async def exported(self) -> str:
        urls = await asyncio.to_thread(self._urls)  # a GCS call: off the event loop
        async with httpx.AsyncClient(timeout=EXPORT_TIMEOUT_S, trust_env=False) as client:
            texts = await asyncio.gather(*(self._read(client, url) for url in urls))
        return "\n".join(texts)

    @staticmethod
    async def _read(client: httpx.AsyncClient, url: str) -> str:
        try:
            response = await client.get(url)
            response.raise_for_status()
            return response.text
        except httpx.HTTPError as exc:
            logger.warning("Ray's metrics export at %s did not answer: %r", url, exc)
            return ""
