"""Job events for SSE: PostgreSQL NOTIFY in, one queue per subscriber of this replica out.

Any worker's events reach any ingress replica: each replica LISTENs once and fans the events
of a job out to its own subscribers. Nothing here is needed to resume a stream elsewhere:
a subscriber reads the job's current state when it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any
from uuid import UUID

from ourvidz_serve.persistence.repository import JobRepository

logger = logging.getLogger(__name__)

SUBSCRIBER_QUEUE_SIZE = 256
"""Events a slow subscriber may fall behind by; beyond it, its oldest events are dropped."""


class JobEventHub:
    def __init__(self, repository: JobRepository) -> None:
        self._repository = repository
        self._subscribers: dict[UUID, set[asyncio.Queue[dict[str, Any]]]] = {}

    async def run(self, beat: Callable[[], None] = lambda: None) -> None:
        """Listen until cancelled (reconnecting after a database restart)."""
        await self._repository.listen_events(self._on_event, on_listening=beat)

    def _on_event(self, payload: str) -> None:
        try:
            event = json.loads(payload)
            job_id = UUID(event["job"])
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring a malformed job event: %.200s", payload)
            return
        for queue in self._subscribers.get(job_id, ()):
            if queue.full():
                # A subscriber that cannot keep up loses its oldest events, not the newest:
                # the final status must still reach it.
                queue.get_nowait()
            queue.put_nowait(event)

    @contextlib.asynccontextmanager
    async def subscribe(self, job_id: UUID) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        """Events of ``job_id`` from now on, until the block ends."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=SUBSCRIBER_QUEUE_SIZE)
        self._subscribers.setdefault(job_id, set()).add(queue)
        try:
            yield queue
        finally:
            subscribers = self._subscribers.get(job_id)
            if subscribers is not None:
                subscribers.discard(queue)
                if not subscribers:
                    del self._subscribers[job_id]

    def subscriber_count(self) -> int:
        return sum(len(queues) for queues in self._subscribers.values())
