"""Per-user data deletion, and what a download of a file retention deleted answers."""

from __future__ import annotations

import asyncio
import logging
from uuid import UUID

from ourvidz_serve.catalog import JOB_TYPES, Queue
from ourvidz_serve.domain import JobStatus
from ourvidz_serve.errors import Forbidden, Gone, StorageError
from ourvidz_serve.jobs.principal import Principal
from ourvidz_serve.observability.metrics import NO_METRICS, Metrics
from ourvidz_serve.persistence.repository import JobRepository
from ourvidz_serve.storage import LOGICAL_BUCKETS, Storage

logger = logging.getLogger(__name__)

DELETE_CONCURRENCY = 16
"""Objects deleted at once."""
_UUID_CHARS = 36


async def delete_keys(storage: Storage, bucket: str, keys: list[str]) -> None:
    """``DELETE_CONCURRENCY`` deletions at a time; the first ``StorageError`` stops all."""
    pending = iter(keys)

    async def drain() -> None:
        for key in pending:
            await storage.delete(bucket, key)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(DELETE_CONCURRENCY, len(keys))):
                group.create_task(drain())
    except* StorageError as errors:
        raise errors.exceptions[0] from None


class UserDataService:
    """Deletes everything kept about one user: jobs, asset rows, files, references, usage."""

    def __init__(
        self, repository: JobRepository, storage: Storage, metrics: Metrics = NO_METRICS
    ) -> None:
        self._repository = repository
        self._storage = storage
        self._metrics = metrics

    async def delete(self, user_id: UUID, principal: Principal) -> None:
        """Cancel the user's unfinished jobs, then delete their rows, then their files.

        Only a service key may (``Forbidden`` otherwise). In order: every queued or running
        job ends ``cancelled`` (a running one's worker is told, and its outcome is fenced out:
        a fenced-out worker deletes what it stored); the job rows go, their asset and
        callback rows with them; then the user's fair-order, GPU-usage and rate-limit rows;
        last every object under ``{user_id}/`` in every bucket, references included.
        Idempotent: a retry after a failure (or a second call) finishes the work.
        """
        if not principal.is_service:
            raise Forbidden("only a service API key may delete a user's data")
        cancelled = await self._repository.cancel_user_jobs(user_id)
        for job in cancelled:
            self._metrics.job_finished(job.job_type, JobStatus.CANCELLED.value)
        rows = await self._repository.delete_user_rows(user_id, [queue.value for queue in Queue])
        files = await self._delete_files(user_id)
        logger.warning(
            "deleted the data of user %s: %d jobs (%d cancelled first), %d files, "
            "%d fair-order, %d GPU-usage and %d rate-limit rows",
            user_id,
            rows.jobs,
            len(cancelled),
            files,
            rows.fair_shares,
            rows.gpu_usage,
            rows.rate_limits,
        )

    async def _delete_files(self, user_id: UUID) -> int:
        """Every object under ``{user_id}/`` in every bucket; the number deleted."""
        deleted = 0
        for bucket in LOGICAL_BUCKETS:
            keys = await self._storage.list_keys(bucket, f"{user_id}/")
            await delete_keys(self._storage, bucket, keys)
            deleted += len(keys)
        return deleted


async def raise_if_expired(repository: JobRepository, bucket: str, key: str) -> None:
    """For a download whose object is missing: ``Gone`` when the key is a file of a job that
    retention expired (``{user_id}/{job_id}...`` in that job's bucket); else return."""
    user_part, _, name = key.partition("/")
    try:
        user_id, job_id = UUID(user_part), UUID(name[:_UUID_CHARS])
    except ValueError:
        return
    if (
        str(user_id) != user_part
        or str(job_id) != name[:_UUID_CHARS]
        or name[_UUID_CHARS : _UUID_CHARS + 1] not in ("_", ".")
    ):
        return  # not a key the service gives a job's file: {user_id}/{job_id}_0.png, .mp4, ...
    expired = await repository.expired_job(job_id, user_id)
    if expired is None:
        return
    job_type, expired_at = expired
    spec = JOB_TYPES.get(job_type)
    if spec is None or spec.bucket != bucket:
        return
    raise Gone(
        "the file was deleted: its job passed the retention period",
        details={"job_id": str(job_id), "expired_at": expired_at.isoformat()},
    )
