"""The retention sweeper: finished jobs older than the retention lose their files.

Every SDXL and WAN replica runs one (``OURVIDZ_RETENTION_DAYS`` set), in a supervised loop.
A round locks a bounded batch of finished jobs that ended more than the retention ago (SKIP
LOCKED, so the replicas' sweepers take disjoint batches), deletes every file of each job —
the keys its rows name and every other key under ``{user_id}/{job_id}`` in its bucket, which
is where an attempt that was fenced out may have left files — and only then sets the job's
``expired_at`` (its downloads answer 410 from then on). A round that fails deletes again what
it deleted already, which is harmless.

The same round also cleans finished jobs that are not expired yet: a job that ended about a
lease ago, and was claimed more than once or did not complete, may hold files that no row
names (an attempt that stored files, then was fenced out and stopped before deleting them);
those keys under its prefix are deleted, the recorded ones kept. Files of a job completed by
its first attempt are all recorded, so such jobs are not even listed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from uuid import UUID

from ourvidz_serve.catalog import JOB_TYPES
from ourvidz_serve.errors import StorageError
from ourvidz_serve.persistence.repository import JobRepository
from ourvidz_serve.persistence.retention import FinishedJobFiles
from ourvidz_serve.settings import Settings
from ourvidz_serve.storage import Storage

logger = logging.getLogger(__name__)

SECONDS_PER_DAY = 86400.0
EXPIRE_BATCH = 50
"""Jobs one round locks and purges (one transaction, held while their files are deleted)."""
ORPHAN_BATCH = 100
"""Finished jobs one round lists for orphaned files."""
CONCURRENCY = 8
"""Jobs whose files are deleted at once."""
BACKLOG_DELAY_S = 1.0
"""The pause before the next round when a round found a full batch (more are due)."""


class RetentionSweeper:
    """Deletes the files of jobs past the retention, then marks them expired."""

    def __init__(
        self,
        repository: JobRepository,
        storage: Storage,
        *,
        retention_s: float,
        orphan_after_s: float,
        interval_s: float,
        batch: int = EXPIRE_BATCH,
        orphan_batch: int = ORPHAN_BATCH,
    ) -> None:
        """``orphan_after_s``: how long after a job ended its unrecorded files count as
        orphans (a lease: a stale attempt's late uploads are in by then); ``interval_s``: how
        often rounds run (each round looks at the jobs that ended in twice that window)."""
        self._repository = repository
        self._storage = storage
        self._retention_s = retention_s
        self._orphan_after_s = orphan_after_s
        self._orphan_window_s = 2 * interval_s
        self._batch = batch
        self._orphan_batch = orphan_batch
        self._slots = asyncio.Semaphore(CONCURRENCY)

    @classmethod
    def from_settings(
        cls, repository: JobRepository, storage: Storage, settings: Settings
    ) -> RetentionSweeper | None:
        """The sweeper the settings ask for; None when no retention is configured."""
        if settings.retention_days is None:
            return None
        return cls(
            repository,
            storage,
            retention_s=settings.retention_days * SECONDS_PER_DAY,
            orphan_after_s=settings.lease_s,
            interval_s=settings.retention_sweep_interval_s,
        )

    async def round(self) -> float | None:
        """One round (for ``Supervisor.every``): expire one batch, clean orphans; a short
        delay when the batch was full, so a backlog drains round after round."""
        expired = await self.expire_once()
        await self.clean_orphans_once()
        return BACKLOG_DELAY_S if len(expired) >= self._batch else None

    async def expire_once(self) -> list[UUID]:
        """Purge and expire one batch; the ids expired. A job whose files could not all be
        deleted stays unexpired (retried next round), and the round then raises the error."""
        errors: list[StorageError] = []

        async def purge(jobs: list[FinishedJobFiles]) -> Collection[UUID]:
            purged = await asyncio.gather(*(self._purge(job, errors) for job in jobs))
            return [job_id for job_id in purged if job_id is not None]

        expired = await self._repository.expire_jobs(self._retention_s, self._batch, purge)
        if expired:
            logger.info("retention: deleted the files of %d jobs, now expired", len(expired))
        if errors:
            raise errors[0]
        return expired

    async def _purge(self, job: FinishedJobFiles, errors: list[StorageError]) -> UUID | None:
        try:
            await self._delete_files(job, keep=frozenset(), named_too=True)
        except StorageError as exc:
            logger.warning("retention: could not delete the files of job %s: %s", job.id, exc)
            errors.append(exc)
            return None
        return job.id

    async def clean_orphans_once(self) -> int:
        """Delete the unrecorded files of recently finished jobs; the number deleted."""
        jobs = await self._repository.jobs_with_possible_orphans(
            self._orphan_after_s, self._orphan_window_s, self._orphan_batch
        )
        deleted = await asyncio.gather(
            *(self._delete_files(job, keep=job.recorded, named_too=False) for job in jobs)
        )
        total = sum(deleted)
        if total:
            logger.warning(
                "retention: deleted %d orphaned files (stored by attempts that did not win)",
                total,
            )
        return total

    async def _delete_files(
        self, job: FinishedJobFiles, keep: frozenset[str], named_too: bool
    ) -> int:
        """Delete every key under the job's prefix but ``keep`` (with ``named_too``, also the
        keys its rows name there, listed or not); the number of keys deleted."""
        bucket = job.bucket or JOB_TYPES[job.job_type].bucket
        async with self._slots:
            listed = await self._storage.list_keys(bucket, job.prefix)
            doomed = set(listed)
            if named_too:
                doomed |= {key for key in job.named if key.startswith(job.prefix)}
            doomed -= keep
            for key in sorted(doomed):
                await self._storage.delete(bucket, key)
        return len(doomed)
