"""Jobs in a given state, through the repository's own statements, with their files stored."""

from __future__ import annotations

from uuid import UUID

import asyncpg

from ourvidz_serve.jobs.planning import plan_job
from ourvidz_serve.jobs.protocol import JobRequest
from ourvidz_serve.persistence.repository import AssetCompletion, JobRecord, JobRepository
from ourvidz_serve.storage import Storage, attempt_key

WORKER = "retention-test-worker"
LEASE_S = 30.0


async def submit(
    repository: JobRepository,
    user: UUID,
    job_type: str,
    owes_callback: bool = False,
    **fields: object,
) -> JobRecord:
    body = {"job_type": job_type, "prompt": "a lighthouse at dusk"} | fields
    plan = plan_job(JobRequest.model_validate(body), user)
    job, _ = await repository.insert_job(plan, owes_callback=owes_callback)
    return job


async def claimed(
    repository: JobRepository, pool: asyncpg.Pool, job: JobRecord, attempts: int = 1
) -> JobRecord:
    """Claim the (only queued) job ``attempts`` times: each earlier attempt's lease expires
    and the reaper queues the job again."""
    for attempt in range(1, attempts + 1):
        [held] = await repository.claim_jobs(job.queue, job.units, WORKER, LEASE_S)
        assert held.id == job.id and held.attempts == attempt
        if attempt < attempts:
            await pool.execute(
                "UPDATE jobs SET lease_expires_at = clock_timestamp() - interval '1 second' "
                "WHERE id = $1",
                job.id,
            )
            await repository.reap_expired_leases(max_attempts=10)
    return held


async def store_files(storage: Storage, job: JobRecord, attempt: int) -> list[str]:
    """Put the files attempt ``attempt`` of the job stores (and a video's poster); their keys."""
    keys = []
    for asset in job.assets:
        key = attempt_key(asset.path, attempt)
        await storage.put(asset.bucket, key, b"asset", "application/octet-stream")
        keys.append(key)
        planned_poster = asset.metadata.get("thumbnail_path")
        if planned_poster:
            poster = attempt_key(str(planned_poster), attempt)
            await storage.put(asset.bucket, poster, b"poster", "image/webp")
            keys.append(poster)
    return keys


async def completed(
    repository: JobRepository,
    pool: asyncpg.Pool,
    storage: Storage,
    user: UUID,
    job_type: str = "sdxl_image_fast",
    attempts: int = 1,
    owes_callback: bool = False,
    **fields: object,
) -> tuple[JobRecord, list[str]]:
    """A job completed by its attempt ``attempts``, its files stored; ``(job, keys)``."""
    submitted = await submit(repository, user, job_type, owes_callback, **fields)
    job = await claimed(repository, pool, submitted, attempts)
    keys = await store_files(storage, job, attempts)
    completions = []
    for asset in job.assets:
        key = attempt_key(asset.path, attempts)
        metadata: dict[str, object] = {"stored_path": key}
        poster = asset.metadata.get("thumbnail_path")
        if poster:
            metadata["thumbnail_path"] = attempt_key(str(poster), attempts)
        completions.append(AssetCompletion(asset.index, key, metadata))
    assert await repository.complete_job(job.id, attempts, {}, completions)
    done = await repository.get_job(job.id)
    assert done is not None
    return done, keys


async def ended_ago(pool: asyncpg.Pool, job_id: UUID, seconds: float) -> None:
    """Move the job's end ``seconds`` into the past."""
    await pool.execute(
        "UPDATE jobs SET completed_at = clock_timestamp() - make_interval(secs => $2) "
        "WHERE id = $1",
        job_id,
        float(seconds),
    )
