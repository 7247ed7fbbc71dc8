"""``GET /metrics``: the application's ``ourvidz_*`` families in Prometheus text format."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from ourvidz_serve.api.dependencies import get_state, require_principal
from ourvidz_serve.api.errors import AUTHENTICATED_ERRORS
from ourvidz_serve.api.state import AppState
from ourvidz_serve.catalog import Queue, Tier
from ourvidz_serve.errors import DatabaseUnavailable
from ourvidz_serve.jobs.principal import Principal
from ourvidz_serve.observability.exposition import recorded_families, render, scraped_families
from ourvidz_serve.persistence.repository import TierQueueFigures

logger = logging.getLogger(__name__)
router = APIRouter(tags=["health"])

SCRAPE_DB_TIMEOUT_S = 2.0


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"description": "Prometheus text format", "content": {CONTENT_TYPE_LATEST: {}}},
        **AUTHENTICATED_ERRORS,
    },
)
async def metrics(
    state: Annotated[AppState, Depends(get_state)],
    _principal: Annotated[Principal, Depends(require_principal)],
) -> Response:
    """Jobs, queues, timings, batch sizes, GPU memory and callbacks of every replica on this
    node, and queue lengths and the last hour's jobs read from PostgreSQL now.

    A database that does not answer within 2 s leaves its families out; the rest is served.
    """
    recorded = recorded_families(await state.metrics_feed.exported())
    queue_lengths: dict[str, int] | None = None
    last_hour: list[tuple[str, str, int]] | None = None
    tiers: list[TierQueueFigures] | None = None
    try:
        queues = [queue.value for queue in Queue]
        queue_lengths = await state.repository.queue_lengths(queues, timeout_s=SCRAPE_DB_TIMEOUT_S)
        last_hour = await state.repository.jobs_last_hour(timeout_s=SCRAPE_DB_TIMEOUT_S)
        tiers = with_every_tier(
            await state.repository.queue_overview(queues, timeout_s=SCRAPE_DB_TIMEOUT_S)
        )
    except (DatabaseUnavailable, TimeoutError) as exc:
        logger.warning("metrics scrape without the database figures: %r", exc)
    if queue_lengths is not None and not any(
        s.labels.get("queue") == "enhance" for f in recorded for s in f.samples
    ):
        queue_lengths["enhance"] = 0  # no enhancer has reported yet: nothing waits in it
    body = render(recorded, scraped_families(queue_lengths, last_hour, tiers))
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def with_every_tier(figures: list[TierQueueFigures]) -> list[TierQueueFigures]:
    """Every queue and tier, zero where nothing waits or runs, so that each series exists
    (a dashboard or an alert on a tier finds it before its first job)."""
    seen = {(row.queue, row.tier) for row in figures}
    return figures + [
        TierQueueFigures(queue.value, tier, 0, 0, 0.0, 0.0)
        for queue in Queue
        for tier in Tier
        if (queue.value, tier) not in seen
    ]
