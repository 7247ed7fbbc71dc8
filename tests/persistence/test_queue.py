"""The queue's SQL on real PostgreSQL: claims, leases, fencing, the reaper and batching."""

import asyncio
from uuid import UUID

import asyncpg

from ourvidz_serve.domain import JobStatus
from ourvidz_serve.jobs.planning import plan_job
from ourvidz_serve.jobs.protocol import JobRequest
from ourvidz_serve.persistence.repository import AssetCompletion, JobRecord, JobRepository

USER = UUID("6f1c1f38-5b8e-4a52-8f8e-0c9a6f0d2b11")
LEASE_S = 30.0


def plan(job_type="sdxl_image_fast", **fields):
    body = {"job_type": job_type, "prompt": "a heron in reeds"} | fields
    return plan_job(JobRequest.model_validate(body), USER)


async def expire_lease(pool: asyncpg.Pool, job_id: UUID) -> None:
    """What a dead replica leaves behind: a lease nobody renews, now in the past."""
    await pool.execute(
        "UPDATE jobs SET lease_expires_at = clock_timestamp() - interval '1 second' WHERE id = $1",
        job_id,
    )


def completions(job: JobRecord, marker: str) -> list[AssetCompletion]:
    return [AssetCompletion(a.index, a.path, {"written_by": marker}) for a in job.assets]


async def test_a_claim_marks_the_job_processing_under_a_lease_held_by_the_worker(repository):
    job, _ = await repository.insert_job(plan(num_images=3))
    [claimed] = await repository.claim_jobs("sdxl_queue", 6, "replica-a", LEASE_S)
    assert claimed.id == job.id
    assert (claimed.status, claimed.attempts, claimed.claimed_by) == (
        JobStatus.PROCESSING,
        1,
        "replica-a",
    )
    assert claimed.lease_expires_at is not None and claimed.started_at is not None
    lease = (claimed.lease_expires_at - claimed.started_at).total_seconds()
    assert LEASE_S - 1 < lease <= LEASE_S + 1


async def test_a_claim_fills_one_pipeline_call_with_compatible_jobs_up_to_the_free_images(
    repository,
):
    one, _ = await repository.insert_job(plan(num_images=1))
    other_type, _ = await repository.insert_job(plan("sdxl_image_high", num_images=1))
    three, _ = await repository.insert_job(plan(num_images=3))
    six, _ = await repository.insert_job(plan(num_images=6))
    another_one, _ = await repository.insert_job(plan(num_images=1))

    async def claim() -> list[UUID]:
        return [job.id for job in await repository.claim_jobs("sdxl_queue", 6, "w", LEASE_S)]

    # Oldest first, same settings only, in order until a job does not fit: 1 + 3, not + 6.
    assert await claim() == [one.id, three.id]
    assert await claim() == [other_type.id]
    assert await claim() == [six.id]  # a 6-image job fills a call alone
    assert await claim() == [another_one.id]
    assert await claim() == []


async def test_the_oldest_job_must_fit_so_younger_small_jobs_never_starve_it(repository):
    big, _ = await repository.insert_job(plan(num_images=6))
    await repository.insert_job(plan(num_images=1))
    assert await repository.claim_jobs("sdxl_queue", 3, "w", LEASE_S) == []
    [claimed] = await repository.claim_jobs("sdxl_queue", 6, "w", LEASE_S)
    assert claimed.id == big.id


async def test_image_to_image_jobs_do_not_share_a_call_with_text_to_image_jobs(repository):
    await repository.insert_job(plan(reference_image_key=f"{USER}/ref.png"))
    await repository.insert_job(plan())
    first = await repository.claim_jobs("sdxl_queue", 6, "w", LEASE_S)
    assert len(first) == 1 and "reference_image_key" in first[0].metadata


async def test_a_heartbeat_extends_only_the_leases_still_held(repository, pool):
    a, _ = await repository.insert_job(plan())
    b, _ = await repository.insert_job(plan("sdxl_image_high"))
    [held] = await repository.claim_jobs("sdxl_queue", 1, "w", 5.0)
    [lost] = await repository.claim_jobs("sdxl_queue", 1, "w", 5.0)
    await expire_lease(pool, lost.id)
    await repository.reap_expired_leases(max_attempts=3)
    kept = await repository.heartbeat({held.id: 1, lost.id: 1}, 60.0)
    assert kept == {held.id}
    renewed = await repository.get_job(held.id)
    assert renewed is not None and renewed.lease_expires_at is not None
    assert renewed.lease_expires_at > held.lease_expires_at
    assert {a.id, b.id} == {held.id, lost.id}


async def test_live_leases_are_not_reaped(repository):
    await repository.insert_job(plan())
    await repository.claim_jobs("sdxl_queue", 1, "w", LEASE_S)
    assert await repository.reap_expired_leases(max_attempts=3) == []


async def test_a_stale_attempt_finishing_after_its_job_was_reclaimed_changes_nothing(
    repository, pool
):
    job, _ = await repository.insert_job(plan(num_images=3))
    [stale] = await repository.claim_jobs("sdxl_queue", 6, "dead-replica", LEASE_S)
    await expire_lease(pool, job.id)
    [reaped] = await repository.reap_expired_leases(max_attempts=3)
    assert (reaped.id, reaped.status, reaped.attempts) == (job.id, JobStatus.QUEUED, 1)
    [fresh] = await repository.claim_jobs("sdxl_queue", 6, "live-replica", LEASE_S)
    assert fresh.attempts == 2

    # The first attempt wakes up and tries every write it could make: all are fenced out.
    assert await repository.heartbeat({job.id: stale.attempts}, LEASE_S) == set()
    assert not await repository.complete_job(
        job.id, stale.attempts, {"by": "stale"}, completions(stale, "stale")
    )
    assert not await repository.fail_job(job.id, stale.attempts, "stale failure", "Stale", {})
    assert not await repository.release_job(job.id, stale.attempts, "dead-replica")
    still = await repository.get_job(job.id)
    assert still is not None
    assert (still.status, still.attempts, still.claimed_by) == (
        JobStatus.PROCESSING,
        2,
        "live-replica",
    )

    assert await repository.complete_job(
        job.id, fresh.attempts, {"by": "fresh"}, completions(fresh, "fresh")
    )
    # ...and it stays fenced after the newer attempt completed.
    assert not await repository.complete_job(
        job.id, stale.attempts, {"by": "stale"}, completions(stale, "stale")
    )
    done = await repository.get_job(job.id)
    assert done is not None and done.status is JobStatus.COMPLETED
    assert done.metadata["by"] == "fresh" and done.error_message is None
    assert [a.metadata["written_by"] for a in done.assets] == ["fresh"] * 3
    assert {a.status for a in done.assets} == {JobStatus.COMPLETED}


async def test_a_job_whose_lease_expires_on_every_attempt_fails_after_the_limit(repository, pool):
    job, _ = await repository.insert_job(plan("video_fast"))
    outcomes = []
    for _ in range(3):
        [claimed] = await repository.claim_jobs("wan_queue", 1, "doomed", LEASE_S)
        await expire_lease(pool, claimed.id)
        [reaped] = await repository.reap_expired_leases(max_attempts=3)
        outcomes.append((reaped.status, reaped.attempts))
    assert outcomes == [(JobStatus.QUEUED, 1), (JobStatus.QUEUED, 2), (JobStatus.FAILED, 3)]
    failed = await repository.get_job(job.id)
    assert failed is not None and failed.status is JobStatus.FAILED
    assert failed.metadata["error_type"] == "LeaseExpired"
    assert failed.error_message is not None and "3 attempts" in failed.error_message
    assert failed.completed_at is not None and failed.lease_expires_at is None
    [asset] = failed.assets
    assert asset.status is JobStatus.FAILED and asset.metadata["error_type"] == "LeaseExpired"
    assert await repository.claim_jobs("wan_queue", 1, "doomed", LEASE_S) == []


async def test_concurrent_reapers_reap_each_expired_job_once(repository, pool):
    for _ in range(8):
        await repository.insert_job(plan())
    claimed = await repository.claim_jobs("sdxl_queue", 6, "w", LEASE_S)
    claimed += await repository.claim_jobs("sdxl_queue", 6, "w", LEASE_S)
    assert len(claimed) == 8
    await pool.execute("UPDATE jobs SET lease_expires_at = clock_timestamp() - interval '1 s'")
    reaped = await asyncio.gather(*(repository.reap_expired_leases(3) for _ in range(4)))
    ids = [job.id for batch in reaped for job in batch]
    assert sorted(ids) == sorted(job.id for job in claimed)
    statuses = await pool.fetch("SELECT DISTINCT status FROM jobs")
    assert [row["status"] for row in statuses] == ["queued"]


async def test_a_requeue_wakes_listeners_with_the_queue_name(repository: JobRepository, pool):
    heard: list[str] = []
    listening = asyncio.create_task(repository.listen(heard.append))
    try:
        await asyncio.sleep(0.3)
        await repository.insert_job(plan("video_fast"))
        [claimed] = await repository.claim_jobs("wan_queue", 1, "w", LEASE_S)
        await expire_lease(pool, claimed.id)
        await repository.reap_expired_leases(3)
        for _ in range(50):
            if len(heard) >= 2:
                break
            await asyncio.sleep(0.05)
        assert heard == ["wan_queue", "wan_queue"]  # the submission, then the requeue
    finally:
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)


async def test_cancel_ends_queued_and_running_jobs_and_tells_the_holder(repository, pool):
    queued, _ = await repository.insert_job(plan(num_images=3))
    running, _ = await repository.insert_job(plan("video_fast"))
    [claimed] = await repository.claim_jobs("wan_queue", 1, "w", LEASE_S)
    queued_heard: list[str] = []
    cancelled_heard: list[UUID] = []
    listening = asyncio.create_task(repository.listen(queued_heard.append, cancelled_heard.append))
    try:
        await asyncio.sleep(0.3)
        assert await repository.cancel_job(queued.id) is JobStatus.QUEUED
        assert await repository.cancel_job(claimed.id) is JobStatus.PROCESSING
        for _ in range(50):
            if cancelled_heard:
                break
            await asyncio.sleep(0.05)
        assert cancelled_heard == [running.id], "only a running job's holder is told"
    finally:
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
    for job_id in (queued.id, running.id):
        job = await repository.get_job(job_id)
        assert job is not None and job.status is JobStatus.CANCELLED
        assert job.completed_at is not None and job.lease_expires_at is None
        assert {asset.status for asset in job.assets} == {JobStatus.CANCELLED}
    # The holder's lease and outcome are fenced out; cancelling again changes nothing.
    assert await repository.heartbeat({claimed.id: claimed.attempts}, LEASE_S) == set()
    assert not await repository.complete_job(
        claimed.id, claimed.attempts, {}, completions(claimed, "late")
    )
    assert await repository.cancel_job(running.id) is JobStatus.CANCELLED
    assert await repository.cancel_job(UUID(int=0)) is None


async def test_a_finished_job_is_left_as_it_is(repository):
    await repository.insert_job(plan())
    [claimed] = await repository.claim_jobs("sdxl_queue", 6, "w", LEASE_S)
    assert await repository.complete_job(
        claimed.id, claimed.attempts, {}, completions(claimed, "k")
    )
    assert await repository.cancel_job(claimed.id) is JobStatus.COMPLETED
    done = await repository.get_job(claimed.id)
    assert done is not None and done.status is JobStatus.COMPLETED


async def test_progress_is_recorded_for_the_current_attempt_only(repository, pool):
    await repository.insert_job(plan("video_fast"))
    [claimed] = await repository.claim_jobs("wan_queue", 1, "w", LEASE_S)
    await repository.record_progress({(claimed.id, claimed.attempts): (4, 25)})
    job = await repository.get_job(claimed.id)
    assert job is not None and job.progress is not None
    assert (job.progress["step"], job.progress["total"]) == (4, 25)
    await repository.record_progress({(claimed.id, claimed.attempts + 1): (9, 25)})  # a stranger
    await expire_lease(pool, claimed.id)
    await repository.reap_expired_leases(3)
    [again] = await repository.claim_jobs("wan_queue", 1, "w2", LEASE_S)
    assert again.progress is None, "a new attempt starts with no progress"
    await repository.record_progress({(claimed.id, claimed.attempts): (20, 25)})  # stale attempt
    current = await repository.get_job(claimed.id)
    assert current is not None and current.progress is None
