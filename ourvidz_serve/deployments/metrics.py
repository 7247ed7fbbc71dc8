"""The metric families in Ray's metrics API, and this node's export read back for ``/metrics``.

Each process records through ``ray.util.metrics``; Ray's agent on each node exports every
process's series at the node's metrics export port (8080 under KubeRay, random under
``serve run``) as ``ray_<name>``. Prometheus scrapes that port on every node; the ingress
reads it on its own node so that ``GET /metrics`` shows the whole application on one machine.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

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


def node_export_url() -> str:
    """Prometheus URL of the metrics export of the node this process runs on."""
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    raise RuntimeError(f"node {node_id} is not in ray.nodes()")


class RayNodeFeed:
    """Reads this node's Ray metrics export (every replica on the node, every family)."""

    def __init__(self, url: str) -> None:
        self._url = url

    async def exported(self) -> str:
        try:
            async with httpx.AsyncClient(timeout=EXPORT_TIMEOUT_S, trust_env=False) as client:
                response = await client.get(self._url)
                response.raise_for_status()
                return response.text
        except httpx.HTTPError as exc:
            logger.warning("Ray's metrics export at %s did not answer: %r", self._url, exc)
            return ""
