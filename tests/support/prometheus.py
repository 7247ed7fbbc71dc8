"""Reading a ``/metrics`` answer with the prometheus client's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def parse(text: str) -> dict[str, tuple[str, list[Sample]]]:
    """``{family name: (type, samples)}`` of Prometheus text."""
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(text)}


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )
