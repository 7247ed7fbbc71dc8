"""The text ``GET /metrics`` answers: the recorded families, and those read at scrape time.

Recorded figures arrive as Prometheus text: Ray's export of each node (families named
``ray_ourvidz_*``, one series per process) or a local registry (``ourvidz_*``). They are
renamed to ``ourvidz_*``, the labels Ray adds (process, node, session, ...) are dropped, and
series left with the same labels are added up, so a counter counts across replicas.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from ourvidz_serve.observability.metrics import (
    ERROR_RATE,
    FAMILIES,
    JOBS_LAST_HOUR,
    QUEUE_LENGTH,
    QUEUE_TIER_BACKLOG,
    QUEUE_TIER_JOBS,
    QUEUE_TIER_OLDEST_WAIT,
    Family,
)


class TierFigures(Protocol):
    """One queue and tier's figures (``persistence.repository.TierQueueFigures``)."""

    @property
    def queue(self) -> str: ...
    @property
    def tier(self) -> str: ...
    @property
    def queued(self) -> int: ...
    @property
    def running(self) -> int: ...
    @property
    def backlog_s(self) -> float: ...
    @property
    def oldest_wait_s(self) -> float | None: ...


RAY_PREFIX = "ray_"
OWN_PREFIX = "ourvidz_"
_DECLARED = {family.name: family for family in FAMILIES}
_HISTOGRAM_LABELS = frozenset({"le"})


def recorded_families(text: str) -> list[Metric]:
    """The ``ourvidz_*`` families of Prometheus ``text``, renamed, relabelled and summed."""
    merged: dict[str, Metric] = {}
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for family in text_string_to_metric_families(text):
        name = family.name.removeprefix(RAY_PREFIX)
        if not name.startswith(OWN_PREFIX):
            continue
        declared = _DECLARED.get(name)
        keep = set(declared.labels) | _HISTOGRAM_LABELS if declared else None
        target = merged.setdefault(name, Metric(name, family.documentation, family.type))
        values = sums.setdefault(name, {})
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue  # a creation timestamp: meaningless once processes are added up
            labels = {
                key: value for key, value in sample.labels.items() if keep is None or key in keep
            }
            key = (OWN_PREFIX + sample.name.split(OWN_PREFIX, 1)[1], tuple(sorted(labels.items())))
            values[key] = values.get(key, 0.0) + sample.value
        if declared is not None:
            target.documentation = declared.help
    for name, target in merged.items():
        for (sample_name, label_items), value in sorted(sums[name].items()):
            target.add_sample(sample_name, dict(label_items), value)
    return list(merged.values())


def _gauge(family: Family, samples: Iterable[tuple[Mapping[str, str], float]]) -> Metric:
    metric = Metric(family.name, family.help, "gauge")
    for labels, value in samples:
        metric.add_sample(family.name, dict(labels), value)
    return metric


def scraped_families(
    queue_lengths: Mapping[str, int] | None,
    jobs_last_hour: Sequence[tuple[str, str, int]] | None,
    tiers: Sequence[TierFigures] | None = None,
) -> list[Metric]:
    """The families read from PostgreSQL at scrape time (None: the read failed, left out)."""
    families = []
    if tiers is not None:
        families += [
            _gauge(
                QUEUE_TIER_JOBS,
                (
                    ({"queue": t.queue, "tier": t.tier, "state": state}, float(count))
                    for t in tiers
                    for state, count in (("queued", t.queued), ("running", t.running))
                ),
            ),
            _gauge(
                QUEUE_TIER_BACKLOG,
                (({"queue": t.queue, "tier": t.tier}, t.backlog_s) for t in tiers),
            ),
            _gauge(
                QUEUE_TIER_OLDEST_WAIT,
                (
                    ({"queue": t.queue, "tier": t.tier}, t.oldest_wait_s)
                    for t in tiers
                    if t.oldest_wait_s is not None
                ),
            ),
        ]
    if queue_lengths is not None:
        families.append(
            _gauge(QUEUE_LENGTH, (({"queue": q}, float(n)) for q, n in queue_lengths.items()))
        )
    if jobs_last_hour is not None:
        families.append(
            _gauge(
                JOBS_LAST_HOUR,
                (({"job_type": t, "status": s}, float(n)) for t, s, n in jobs_last_hour),
            )
        )
        finished: dict[str, int] = {}
        failed: dict[str, int] = {}
        for job_type, status, count in jobs_last_hour:
            if status in ("completed", "failed"):
                finished[job_type] = finished.get(job_type, 0) + count
            if status == "failed":
                failed[job_type] = failed.get(job_type, 0) + count
        families.append(
            _gauge(
                ERROR_RATE,
                (({"job_type": t}, failed.get(t, 0) / n) for t, n in sorted(finished.items())),
            )
        )
    return families


def render(*sources: Iterable[Metric]) -> bytes:
    """Prometheus text of the families of every source; same-named families are joined.

    Every declared family is shown, with no samples until something was recorded (Ray
    exports a metric only once it has a value), so a dashboard or alert finds its name.
    """
    joined: dict[str, Metric] = {
        family.name: Metric(family.name, family.help, family.kind.value) for family in FAMILIES
    }
    for source in sources:
        for family in source:
            if family.name in joined:
                joined[family.name].samples.extend(family.samples)
            else:
                joined[family.name] = Metric(family.name, family.documentation, family.type)
                joined[family.name].samples.extend(family.samples)

    class _Families(Collector):
        def collect(self) -> Iterable[Metric]:
            return list(joined.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families())
    return generate_latest(registry)


class MetricsFeed(Protocol):
    """Where the recorded figures are read: Ray's export of every node, or a local registry."""

    async def exported(self) -> str:
        """Prometheus text holding (among others) the ``ourvidz_*`` families."""
        ...


class RegistryFeed:
    """The process's own registry (no Ray: the app in-process, tests)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    async def exported(self) -> str:
        return generate_latest(self._registry).decode()
