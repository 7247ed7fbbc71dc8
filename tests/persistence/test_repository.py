import asyncio
from uuid import UUID, uuid4

import asyncpg
import pytest

from ourvidz_serve.errors import Conflict, InvalidRequest
from ourvidz_serve.jobs.planning import plan_job
from ourvidz_serve.jobs.protocol import JobRequest, JobStatus
from ourvidz_serve.persistence.repository import (
    AssetCompletion,
    JobFilters,
    JobRepository,
    JobStateError,
)

USER = UUID("6f1c1f38-5b8e-4a52-8f8e-0c9a6f0d2b11")


def plan(job_type="sdxl_image_fast", user=USER, key=None, **fields):
    body = {"job_type": job_type, "prompt": "a red fox in snow"} | fields
    return plan_job(JobRequest.model_validate(body), user, idempotency_key=key)


WORKER = "test-worker"
LEASE_S = 30.0


async def claim(repository: JobRepository, queue: str, units: int):
    return await repository.claim_jobs(queue, units, WORKER, LEASE_S)


async def image_rows(pool: asyncpg.Pool, job_id: UUID):
    return await pool.fetch(
        "SELECT id, image_index, status, image_url FROM images WHERE job_id = $1 "
        "ORDER BY image_index",
        job_id,
    )


async def test_a_six_image_job_has_six_queued_rows_from_submission_on(repository, pool):
    job, created = await repository.insert_job(plan(num_images=6, seed=9))
    assert created
    rows = await image_rows(pool, job.id)
    assert [row["image_index"] for row in rows] == list(range(6))
    assert {row["status"] for row in rows} == {"queued"}
    assert [a.seed for a in job.assets] == [9, 10, 11, 12, 13, 14]


async def test_completion_updates_the_asset_rows_and_never_inserts(repository, pool):
    job, _ = await repository.insert_job(plan(num_images=6))
    before = await image_rows(pool, job.id)
    [claimed] = await claim(repository, "sdxl_queue", 10)
    assert await repository.complete_job(
        claimed.id,
        claimed.attempts,
        {"generation_time": 1.5},
        [AssetCompletion(a.index, a.path or "", {"width": 64}) for a in claimed.assets],
    )
    after = await image_rows(pool, job.id)
    assert [r["id"] for r in after] == [r["id"] for r in before]
    assert {r["status"] for r in after} == {"completed"}
    done = await repository.get_job(job.id)
    assert done is not None and done.status is JobStatus.COMPLETED
    assert done.completed_at is not None
    assert done.metadata["generation_time"] == 1.5
    assert all(a.metadata["width"] == 64 and a.metadata["seed"] is not None for a in done.assets)


async def test_completing_an_asset_without_a_row_fails_and_changes_nothing(repository):
    job, _ = await repository.insert_job(plan(num_images=1))
    [claimed] = await claim(repository, "sdxl_queue", 1)
    with pytest.raises(JobStateError, match="has no row"):
        await repository.complete_job(job.id, claimed.attempts, {}, [AssetCompletion(5, "x", {})])
    unchanged = await repository.get_job(job.id)
    assert unchanged is not None and unchanged.status is JobStatus.PROCESSING
    assert {a.status for a in unchanged.assets} == {JobStatus.PROCESSING}


async def test_only_a_processing_job_can_be_completed(repository):
    job, _ = await repository.insert_job(plan(num_images=1))
    completion = [AssetCompletion(0, job.assets[0].path, {})]
    assert not await repository.complete_job(job.id, 0, {}, completion)
    [claimed] = await claim(repository, "sdxl_queue", 1)
    assert await repository.complete_job(job.id, claimed.attempts, {}, completion)
    assert not await repository.complete_job(job.id, claimed.attempts, {}, completion)
    assert not await repository.fail_job(job.id, claimed.attempts, "too late", "Probe", {})
    done = await repository.get_job(job.id)
    assert done is not None and done.status is JobStatus.COMPLETED
    assert "error_type" not in done.metadata


async def test_asset_urls_are_set_on_completion_not_at_submission(repository, pool):
    job, _ = await repository.insert_job(plan("video_fast"))
    row = await pool.fetchrow("SELECT video_url, metadata FROM videos")
    assert row["video_url"] is None
    assert row["metadata"]["stored_path"] == job.assets[0].path == f"{USER}/{job.id}.mp4"
    [claimed] = await claim(repository, "wan_queue", 1)
    completion = [AssetCompletion(0, job.assets[0].path, {})]
    assert await repository.complete_job(job.id, claimed.attempts, {}, completion)
    assert await pool.fetchval("SELECT video_url FROM videos") == job.assets[0].path


async def test_a_released_job_is_queued_again_with_its_attempt_given_back(repository):
    job, _ = await repository.insert_job(plan(num_images=3))
    [claimed] = await claim(repository, "sdxl_queue", 3)
    assert not await repository.release_job(job.id, claimed.attempts, "another-replica")
    assert await repository.release_job(job.id, claimed.attempts, WORKER)
    queued = await repository.get_job(job.id)
    assert queued is not None and queued.status is JobStatus.QUEUED
    assert queued.started_at is None and queued.attempts == 0
    assert {a.status for a in queued.assets} == {JobStatus.QUEUED}
    assert queued.claimed_by is None and queued.lease_expires_at is None
    [again] = await repository.claim_jobs("sdxl_queue", 3, "next-replica", LEASE_S)
    assert again.attempts == 1
    # The releasing replica's number is taken again, by another holder: its release is fenced.
    assert not await repository.release_job(job.id, claimed.attempts, WORKER)
    assert not await repository.release_job(uuid4(), 1, WORKER)
    # A replica stopped for failing its health check keeps the attempt counted.
    assert await repository.release_job(job.id, again.attempts, "next-replica", give_back=False)
    kept = await repository.get_job(job.id)
    assert kept is not None and (kept.status, kept.attempts) == (JobStatus.QUEUED, 1)


async def test_a_wan_video_job_has_exactly_one_video_row(repository, pool):
    job, _ = await repository.insert_job(plan("video_fast"))
    count = await pool.fetchval("SELECT count(*) FROM videos WHERE job_id=$1", job.id)
    assert count == 1
    assert await pool.fetchval("SELECT count(*) FROM images") == 0
    assert job.assets[0].kind.value == "video"


async def test_concurrent_claims_never_hand_out_a_job_twice(repository):
    for _ in range(20):
        await repository.insert_job(plan())
    batches = await asyncio.gather(*(claim(repository, "sdxl_queue", 3) for _ in range(10)))
    claimed = [job.id for batch in batches for job in batch]
    assert len(claimed) == 20
    assert len(set(claimed)) == 20
    assert all(job.status is JobStatus.PROCESSING for batch in batches for job in batch)
    assert await claim(repository, "sdxl_queue", 3) == []


async def test_claims_take_the_oldest_of_the_right_queue(repository):
    first, _ = await repository.insert_job(plan())
    await repository.insert_job(plan("video_fast"))
    await repository.insert_job(plan())
    [claimed] = await claim(repository, "sdxl_queue", 1)
    assert claimed.id == first.id
    assert claimed.attempts == 1
    assert claimed.claimed_by == WORKER and claimed.lease_expires_at is not None
    assert {a.status for a in claimed.assets} == {JobStatus.PROCESSING}


async def test_failure_records_message_and_error_type_on_job_and_assets(repository):
    job, _ = await repository.insert_job(plan(num_images=3))
    [claimed] = await claim(repository, "sdxl_queue", 3)
    assert await repository.fail_job(
        job.id, claimed.attempts, "out of paint", "GenerationError", {"total_time": 1}
    )
    failed = await repository.get_job(job.id)
    assert failed is not None and failed.status is JobStatus.FAILED
    assert failed.error_message == "out of paint"
    assert failed.metadata["error_type"] == "GenerationError"
    assert {a.status for a in failed.assets} == {JobStatus.FAILED}


async def test_listing_is_newest_first_filtered_and_cursor_paginated(repository):
    other = uuid4()
    ids = [(await repository.insert_job(plan()))[0].id for _ in range(5)]
    await repository.insert_job(plan(user=other))
    await repository.insert_job(plan("image_fast"))
    seen, cursor = [], None
    while True:
        page, cursor = await repository.list_jobs(
            JobFilters(user_id=USER, job_type="sdxl_image_fast"), 2, cursor
        )
        seen += [job.id for job in page]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    queued, _ = await repository.list_jobs(JobFilters(status=JobStatus.QUEUED), 100, None)
    assert len(queued) == 7


async def test_a_garbled_cursor_is_a_clear_error(repository):
    with pytest.raises(InvalidRequest, match="cursor"):
        await repository.list_jobs(JobFilters(), 10, "not-a-cursor")


async def test_the_same_idempotency_key_returns_the_original_job(repository, pool):
    first, created = await repository.insert_job(plan(key="k1", seed=1))
    again, created_again = await repository.insert_job(plan(key="k1", seed=1))
    assert created and not created_again
    assert again.id == first.id
    assert await pool.fetchval("SELECT count(*) FROM jobs") == 1
    with pytest.raises(Conflict):
        await repository.insert_job(plan(key="k1", seed=2))
    assert await pool.fetchval("SELECT count(*) FROM images") == 1


async def test_queued_units_count_images_for_sdxl_and_jobs_for_wan(repository):
    await repository.insert_job(plan(num_images=6))
    await repository.insert_job(plan(num_images=3))
    await repository.insert_job(plan("video_fast"))
    assert await repository.queued_units("sdxl_queue") == 9
    assert await repository.queued_units("wan_queue") == 1
    assert await repository.queued_units("sdxl_queue", max_jobs=1) == 6


async def test_concurrent_requests_spend_one_rate_budget_exactly(repository):
    """Many connections at once, as from several ingress replicas: the burst, not more."""
    waits = await asyncio.gather(
        *(repository.take_rate_token("user:concurrent", 0.1, 3) for _ in range(12))
    )
    assert sum(wait is None for wait in waits) == 3
    assert all(wait is None or 0 <= wait <= 30 for wait in waits)
    later = await repository.take_rate_token("user:concurrent", 0.1, 3)
    assert later is not None and 9 < later <= 30
    assert await repository.take_rate_token("user:someone-else", 0.1, 3) is None
