"""Reading a ``/metrics`` answer with the prometheus client's own parser."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
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


Families = dict[str, tuple[str, list[Sample]]]


async def scrape_until(
    http: httpx.AsyncClient, ready: Callable[[Families], bool], timeout_s: float = 90
) -> Families:
    """Ray exports what processes record every few seconds: scrape until it has arrived."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = await http.get("/metrics")
        assert response.status_code == 200, response.text
        families = parse(response.text)
        if ready(families) or time.monotonic() > deadline:
            return families
        await asyncio.sleep(2)
