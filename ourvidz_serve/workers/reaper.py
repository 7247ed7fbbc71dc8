"""The reaper: expired leases go back to the queue, or fail past the attempt limit.

Its statement is idempotent and skips locked rows, so every replica with a pool runs one, in
a supervised loop.
"""

from __future__ import annotations

import logging

from ourvidz_serve.domain import JobStatus
from ourvidz_serve.persistence.repository import JobRepository, ReapedJob

logger = logging.getLogger(__name__)


async def reap_once(repository: JobRepository, max_attempts: int) -> list[ReapedJob]:
    reaped = await repository.reap_expired_leases(max_attempts)
    for job in reaped:
        if job.status is JobStatus.FAILED:
            logger.error(
                "job %s failed: its lease expired on all %d attempts", job.id, job.attempts
            )
        else:
            logger.warning("job %s lease expired on attempt %d; queued again", job.id, job.attempts)
    return reaped
