"""Every ``ourvidz_*`` metric family, defined once, and the recorder the code calls.

Where the figures go depends on the process, not on the code that records them:

- Under Ray (every deployment, the ingress included) a :class:`Metrics` writes to Ray's
  metrics API (``ray.util.metrics``, see ``deployments/metrics.py``). Ray aggregates each
  node's processes and exports them at the node's metrics export port, the port KubeRay's
  monitors scrape, next to Serve's own ``ray_serve_*`` families. Ray prefixes them
  ``ray_``: ``ray_ourvidz_jobs_finished_total``.
- Without Ray (tests, the app in-process) it writes to a ``prometheus_client`` registry.

``GET /metrics`` on the ingress shows both as ``ourvidz_*``: the Ray export of every alive
node (so every replica is counted, whichever process on whichever node recorded it) with the
``ray_`` prefix and Ray's process labels taken off, plus figures read from PostgreSQL at
scrape time (queue lengths, jobs of the last hour, error rate). This module needs neither
Ray nor a database.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Kind(StrEnum):
    COUNTER = "counter"
    HISTOGRAM = "histogram"
    GAUGE = "gauge"


@dataclass(frozen=True)
class Family:
    name: str
    """Without the ``_total`` a counter's samples get."""
    kind: Kind
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()


SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)

JOBS_SUBMITTED = Family(
    "ourvidz_jobs_submitted", Kind.COUNTER, "Jobs accepted (202), by job type", ("job_type",)
)
JOBS_FINISHED = Family(
    "ourvidz_jobs_finished",
    Kind.COUNTER,
    "Jobs that ended, by job type and status (completed, failed, cancelled)",
    ("job_type", "status"),
)
GENERATION_SECONDS = Family(
    "ourvidz_generation_seconds",
    Kind.HISTOGRAM,
    "Model time of completed jobs (their pipeline call), by job type",
    ("job_type",),
    SECONDS_BUCKETS,
)
QUEUE_WAIT_SECONDS = Family(
    "ourvidz_queue_wait_seconds",
    Kind.HISTOGRAM,
    "Submission to claim by the replica that runs the job, by job type",
    ("job_type",),
    SECONDS_BUCKETS,
)
QUEUE_LENGTH = Family(
    "ourvidz_queue_length",
    Kind.GAUGE,
    "Jobs waiting: sdxl_queue and wan_queue read from PostgreSQL at scrape time; enhance: "
    "prompts waiting in or for the enhancer's batches",
    ("queue",),
)
IMAGES_PER_CALL = Family(
    "ourvidz_images_per_pipeline_call",
    Kind.HISTOGRAM,
    "Outputs of one pipeline call (SDXL: images batched across jobs; WAN: 1), by model",
    ("model",),
    # Half-integers: Ray rebuilds a histogram's observations at its buckets' midpoints, so
    # with one integer per bucket its _sum is exact (the seconds histograms' sums are not).
    tuple(count + 0.5 for count in range(17)),
)
GENERATION_TIME_RATIO = Family(
    "ourvidz_generation_time_ratio",
    Kind.HISTOGRAM,
    "Actual / expected generation time of completed jobs (the catalog's expectation)",
    ("job_type",),
    (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0),
)
GPU_MEMORY_USED = Family(
    "ourvidz_gpu_memory_used_bytes",
    Kind.GAUGE,
    "GPU memory a model replica holds (PyTorch's reserved memory; 0 on a CPU)",
    ("deployment", "replica"),
)
GPU_MEMORY_TOTAL = Family(
    "ourvidz_gpu_memory_total_bytes",
    Kind.GAUGE,
    "Memory of the GPU a model replica runs on (0 on a CPU)",
    ("deployment", "replica"),
)
CALLBACK_DELIVERIES = Family(
    "ourvidz_callback_deliveries",
    Kind.COUNTER,
    "Callback delivery attempts by outcome (delivered, retrying, failed)",
    ("outcome",),
)
JOBS_LAST_HOUR = Family(
    "ourvidz_jobs_last_hour",
    Kind.GAUGE,
    "Jobs submitted in the last hour, by job type and current status (PostgreSQL, at scrape)",
    ("job_type", "status"),
)
ERROR_RATE = Family(
    "ourvidz_error_rate_last_hour",
    Kind.GAUGE,
    "Failed / finished among the last hour's finished jobs, by job type (at scrape time)",
    ("job_type",),
)

QUEUE_TIER_JOBS = Family(
    "ourvidz_queue_tier_jobs",
    Kind.GAUGE,
    "Jobs queued and running per queue and tier (state: queued, running; PostgreSQL, at scrape)",
    ("queue", "tier", "state"),
)
QUEUE_TIER_BACKLOG = Family(
    "ourvidz_queue_tier_backlog_gpu_seconds",
    Kind.GAUGE,
    "Expected GPU seconds of the queued jobs, per queue and tier (at scrape time)",
    ("queue", "tier"),
)
QUEUE_TIER_OLDEST_WAIT = Family(
    "ourvidz_queue_tier_oldest_wait_seconds",
    Kind.GAUGE,
    "How long the oldest queued job of each queue and tier has waited (at scrape time)",
    ("queue", "tier"),
)
GPU_SECONDS_CHARGED = Family(
    "ourvidz_gpu_seconds_charged",
    Kind.COUNTER,
    "GPU seconds charged to users (measured time times the GPU share), by queue and tier",
    ("queue", "tier"),
)

RECORDED: tuple[Family, ...] = (
    JOBS_SUBMITTED,
    JOBS_FINISHED,
    GENERATION_SECONDS,
    QUEUE_WAIT_SECONDS,
    IMAGES_PER_CALL,
    GENERATION_TIME_RATIO,
    GPU_MEMORY_USED,
    GPU_MEMORY_TOTAL,
    CALLBACK_DELIVERIES,
    GPU_SECONDS_CHARGED,
)
"""Recorded by the processes as things happen."""
SCRAPED: tuple[Family, ...] = (
    QUEUE_LENGTH,
    JOBS_LAST_HOUR,
    ERROR_RATE,
    QUEUE_TIER_JOBS,
    QUEUE_TIER_BACKLOG,
    QUEUE_TIER_OLDEST_WAIT,
)
"""Computed by the ingress when ``/metrics`` is read (``enhance`` queue length is recorded)."""
FAMILIES: tuple[Family, ...] = (*RECORDED, *SCRAPED)


class Instrument(Protocol):
    """One family in one backend."""

    def record(self, labels: Mapping[str, str], value: float) -> None:
        """Counter: add ``value``; histogram: observe it; gauge: set it."""


class Backend(Protocol):
    def instrument(self, family: Family) -> Instrument: ...


class Metrics:
    """What the service records, in its own words; the backend decides where it goes."""

    def __init__(self, backend: Backend) -> None:
        self._instruments = {
            family.name: backend.instrument(family) for family in (*RECORDED, QUEUE_LENGTH)
        }

    def _record(self, family: Family, value: float, **labels: str) -> None:
        self._instruments[family.name].record(labels, value)

    def job_submitted(self, job_type: str) -> None:
        self._record(JOBS_SUBMITTED, 1, job_type=job_type)

    def job_started(self, job_type: str, queue_wait_s: float) -> None:
        self._record(QUEUE_WAIT_SECONDS, max(queue_wait_s, 0.0), job_type=job_type)

    def job_finished(
        self,
        job_type: str,
        status: str,
        generation_s: float | None = None,
        expected_s: float | None = None,
    ) -> None:
        self._record(JOBS_FINISHED, 1, job_type=job_type, status=status)
        if generation_s is not None:
            self._record(GENERATION_SECONDS, generation_s, job_type=job_type)
            if expected_s:
                self._record(GENERATION_TIME_RATIO, generation_s / expected_s, job_type=job_type)

    def pipeline_call(self, model: str, outputs: int) -> None:
        self._record(IMAGES_PER_CALL, outputs, model=model)

    def callback_delivery(self, outcome: str) -> None:
        self._record(CALLBACK_DELIVERIES, 1, outcome=outcome)

    def gpu_memory(self, deployment: str, replica: str, used: int, total: int) -> None:
        self._record(GPU_MEMORY_USED, used, deployment=deployment, replica=replica)
        self._record(GPU_MEMORY_TOTAL, total, deployment=deployment, replica=replica)

    def gpu_seconds_charged(self, queue: str, tier: str, seconds: float) -> None:
        if seconds > 0:
            self._record(GPU_SECONDS_CHARGED, seconds, queue=queue, tier=tier)

    def enhance_queue(self, waiting: int) -> None:
        self._record(QUEUE_LENGTH, waiting, queue="enhance")


class _PrometheusInstrument:
    def __init__(self, family: Family, registry: CollectorRegistry) -> None:
        self._kind = family.kind
        metric: Counter | Histogram | Gauge
        if family.kind is Kind.COUNTER:
            metric = Counter(family.name, family.help, family.labels, registry=registry)
        elif family.kind is Kind.HISTOGRAM:
            metric = Histogram(
                family.name, family.help, family.labels, registry=registry, buckets=family.buckets
            )
        else:
            metric = Gauge(family.name, family.help, family.labels, registry=registry)
        self._metric = metric

    def record(self, labels: Mapping[str, str], value: float) -> None:
        child = self._metric.labels(**labels)
        if isinstance(child, Counter):
            child.inc(value)
        elif isinstance(child, Histogram):
            child.observe(value)
        else:
            child.set(value)


class PrometheusBackend:
    """The process's own registry: where figures go without Ray."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()

    def instrument(self, family: Family) -> Instrument:
        return _PrometheusInstrument(family, self.registry)


class _Discard:
    def record(self, labels: Mapping[str, str], value: float) -> None:
        return None


class DiscardBackend:
    def instrument(self, family: Family) -> Instrument:
        return _Discard()


NO_METRICS = Metrics(DiscardBackend())
"""For code that runs with nothing to report to (unit tests of other things)."""


def family_names(families: Sequence[Family] = FAMILIES) -> dict[str, Kind]:
    """Exported family name -> type (as the Prometheus text parser names them)."""
    return {family.name: family.kind for family in families}
