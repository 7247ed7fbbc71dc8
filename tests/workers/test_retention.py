"""The retention sweeper over real PostgreSQL and local storage."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import pytest

from ourvidz_serve.domain import JobStatus
from ourvidz_serve.persistence.repository import JobRepository
from ourvidz_serve.settings import Settings
from ourvidz_serve.storage import REFERENCE_IMAGES_BUCKET, Storage
from ourvidz_serve.storage.local import LocalStorage
from ourvidz_serve.workers.retention import RetentionSweeper
from tests.support.finished_jobs import claimed, completed, ended_ago, store_files, submit

RETENTION_S = 3.0


@pytest.fixture
def retention_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"retention_days": RETENTION_S / 86400})


@pytest.fixture
def sweeper(
    repository: JobRepository, local_storage: LocalStorage, retention_settings: Settings
) -> RetentionSweeper:
    built = RetentionSweeper.from_settings(repository, local_storage, retention_settings)
    assert built is not None
    return built


async def keys_of(storage: Storage, bucket: str, user: UUID, job_id: UUID) -> list[str]:
    return await storage.list_keys(bucket, f"{user}/{job_id}")


async def expired_at(pool: asyncpg.Pool, job_id: UUID) -> Any:
    return await pool.fetchval("SELECT expired_at FROM jobs WHERE id = $1", job_id)


def test_no_retention_setting_means_no_sweeper(
    repository: JobRepository, local_storage: LocalStorage, settings: Settings
) -> None:
    assert settings.retention_days is None
    assert RetentionSweeper.from_settings(repository, local_storage, settings) is None


async def test_a_job_past_the_retention_loses_every_file_and_expires_the_rest_stays(
    repository: JobRepository,
    pool: asyncpg.Pool,
    local_storage: LocalStorage,
    sweeper: RetentionSweeper,
) -> None:
    user, other = uuid4(), uuid4()
    storage = local_storage
    # Old: a 3-image job, plus a file a fenced-out second attempt left behind; a video with its
    # poster; a cancelled job with a stray upload.
    images, image_keys = await completed(repository, pool, storage, user, num_images=3)
    orphan = f"{user}/{images.id}_0.attempt-2.png"
    await storage.put("sdxl_image_fast", orphan, b"stale", "image/png")
    video, video_keys = await completed(repository, pool, storage, user, "video_fast")
    assert any(key.endswith("_poster.webp") for key in video_keys)
    cancelled = await claimed(repository, pool, await submit(repository, user, "image_fast"))
    stray = await store_files(storage, cancelled, 1)
    assert await repository.cancel_job(cancelled.id) is JobStatus.PROCESSING
    for job in (images, video, cancelled):
        await ended_ago(pool, job.id, RETENTION_S + 60)
    # Young: completed just now. Unfinished: one running (its file stored), one queued.
    young, young_keys = await completed(repository, pool, storage, other)
    running = await claimed(repository, pool, await submit(repository, user, "video_fast"))
    running_keys = await store_files(storage, running, 1)
    queued = await submit(repository, user, "sdxl_image_fast")
    # A reference image of the user: not a job's file, retention keeps it.
    reference = f"{user}/{'ab' * 32}.png"
    await storage.put(REFERENCE_IMAGES_BUCKET, reference, b"ref", "image/png")

    assert await sweeper.round() is None

    assert await keys_of(storage, "sdxl_image_fast", user, images.id) == []
    assert await keys_of(storage, "video_fast", user, video.id) == []
    assert await keys_of(storage, "image_fast", user, cancelled.id) == []
    for job in (images, video, cancelled):
        assert await expired_at(pool, job.id) is not None
    assert image_keys and stray
    assert await keys_of(storage, "sdxl_image_fast", other, young.id) == sorted(young_keys)
    assert await expired_at(pool, young.id) is None
    assert await keys_of(storage, "video_fast", user, running.id) == sorted(running_keys)
    for job in (running, queued):
        row = await pool.fetchrow("SELECT status, expired_at FROM jobs WHERE id = $1", job.id)
        assert row["expired_at"] is None and row["status"] in ("processing", "queued")
    assert await storage.exists(REFERENCE_IMAGES_BUCKET, reference)

    # Running it again is harmless: nothing more to do, nothing changes.
    first_expiry = await expired_at(pool, images.id)
    assert await sweeper.round() is None
    assert await sweeper.expire_once() == []
    assert await expired_at(pool, images.id) == first_expiry
    assert await keys_of(storage, "sdxl_image_fast", other, young.id) == sorted(young_keys)


async def test_the_young_job_expires_once_it_is_older_than_the_retention(
    repository: JobRepository,
    pool: asyncpg.Pool,
    local_storage: LocalStorage,
    sweeper: RetentionSweeper,
) -> None:
    user = uuid4()
    job, _ = await completed(repository, pool, local_storage, user)
    assert await sweeper.expire_once() == []
    await ended_ago(pool, job.id, RETENTION_S + 0.5)
    assert await sweeper.expire_once() == [job.id]
    assert await keys_of(local_storage, "sdxl_image_fast", user, job.id) == []
    resource = await repository.get_job(job.id)
    assert resource is not None and resource.expired_at is not None


class SlowListing:
    """Storage whose listings take a while: a sweep still deleting when another one starts."""

    def __init__(self, inner: Storage) -> None:
        self._inner = inner

    async def list_keys(self, bucket: str, prefix: str) -> list[str]:
        await asyncio.sleep(0.3)
        return await self._inner.list_keys(bucket, prefix)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def test_concurrent_sweepers_take_each_job_once(
    repository: JobRepository, pool: asyncpg.Pool, local_storage: LocalStorage
) -> None:
    user = uuid4()
    jobs = [(await completed(repository, pool, local_storage, user))[0] for _ in range(3)]
    for job in jobs:
        await ended_ago(pool, job.id, 60)
    slow: Any = SlowListing(local_storage)
    sweepers = [
        RetentionSweeper(
            repository, slow, retention_s=RETENTION_S, orphan_after_s=30, interval_s=60, batch=2
        )
        for _ in range(2)
    ]
    first, second = await asyncio.gather(*(sweeper.expire_once() for sweeper in sweepers))
    assert not set(first) & set(second)
    assert len(first) + len(second) == 3 or len(first) + len(second) == 2
    # Whatever a busy sweeper left is taken by the next round.
    rest = await sweepers[0].expire_once()
    assert {*first, *second, *rest} == {job.id for job in jobs}


async def test_a_recently_finished_re_run_loses_the_files_no_row_names(
    repository: JobRepository, pool: asyncpg.Pool, local_storage: LocalStorage
) -> None:
    """Orphans of a fenced-out attempt go a lease after the job ended, long before expiry."""
    user = uuid4()
    storage = local_storage
    job, kept = await completed(repository, pool, storage, user, "video_fast", attempts=2)
    assert all(".attempt-2." in key for key in kept)
    # What attempt 1 stored (at the planned keys) before it was fenced out.
    orphans = [f"{user}/{job.id}.mp4", f"{user}/{job.id}_poster.webp"]
    for key in orphans:
        await storage.put("video_fast", key, b"stale", "application/octet-stream")
    await ended_ago(pool, job.id, 5)
    sweeper = RetentionSweeper(
        repository, storage, retention_s=3600, orphan_after_s=1, interval_s=60
    )
    assert await sweeper.clean_orphans_once() == len(orphans) == 2
    assert await keys_of(storage, "video_fast", user, job.id) == sorted(kept)
    assert await expired_at(pool, job.id) is None
    # Jobs that ended less than orphan_after_s ago are not looked at yet.
    fresh, _ = await completed(repository, pool, storage, user, "video_fast", attempts=2)
    late = f"{user}/{fresh.id}.mp4"
    await storage.put("video_fast", late, b"stale", "video/mp4")
    assert await sweeper.clean_orphans_once() == 0
    assert late in await keys_of(storage, "video_fast", user, fresh.id)
