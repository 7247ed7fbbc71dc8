"""Fair order between users, through the real queue worker and tiny WAN pipeline, on real
PostgreSQL: claims follow each user's virtual time, weighted by tier, not arrival order."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from uuid import UUID, uuid4

import asyncpg

from ourvidz_serve.catalog import Queue, Tier
from ourvidz_serve.domain import JobStatus
from ourvidz_serve.jobs.planning import plan_job
from ourvidz_serve.jobs.protocol import JobRequest
from ourvidz_serve.jobs.scheduling import SchedulingPolicy
from ourvidz_serve.persistence.repository import JobRecord, JobRepository
from ourvidz_serve.settings import Settings
from ourvidz_serve.storage.local import LocalStorage
from ourvidz_serve.workers.handlers import WanJobHandler
from ourvidz_serve.workers.worker import QueueWorker, WorkerConfig
from tests.inprocess import InProcessModels, TinyRunners
from tests.workers.test_worker import eventually

HEAVY = UUID("00000000-0000-4000-8000-00000000000a")
LIGHT = UUID("00000000-0000-4000-8000-00000000000b")
POLICY = SchedulingPolicy()  # premium 4, standard 2, bulk 1


async def submit(
    repository: JobRepository, user: UUID, tier: Tier = Tier.STANDARD, job_type: str = "image_fast"
) -> JobRecord:
    request = JobRequest.model_validate({"job_type": job_type, "prompt": "a fox in snow"})
    job, _ = await repository.insert_job(
        plan_job(request, user, tier=tier), weight=POLICY.weight(tier)
    )
    return job


@asynccontextmanager
async def wan_worker(
    repository: JobRepository, storage: LocalStorage, settings: Settings, runners: TinyRunners
) -> AsyncIterator[QueueWorker]:
    """One WAN replica's worker (one job per call), as Serve runs it."""
    await storage.start()
    worker = QueueWorker(
        repository,
        storage,
        WanJobHandler(runners.wan, InProcessModels(runners.enhancer)),
        dataclasses.replace(WorkerConfig.for_queue(settings, Queue.WAN), poll_interval_s=0.05),
        "fair-worker",
    )
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


async def started_in_order(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    """Every job that was claimed, in claim order."""
    return await pool.fetch(
        "SELECT id, user_id, tier, cost_s FROM jobs WHERE started_at IS NOT NULL "
        "ORDER BY started_at, id"
    )


async def test_a_light_users_job_is_claimed_within_two_after_a_heavy_users_twenty(
    repository, pool, settings, local_storage, tiny_runners
):
    heavy = [await submit(repository, HEAVY) for _ in range(20)]
    light = await submit(repository, LIGHT)
    async with wan_worker(repository, local_storage, settings, tiny_runners):

        async def light_done() -> bool:
            job = await repository.get_job(light.id)
            return job is not None and job.status is JobStatus.COMPLETED

        await eventually(light_done, 60, "the light user's job completed")
    order = [row["id"] for row in await started_in_order(pool)]
    assert light.id in order[:2], order.index(light.id) if light.id in order else "never"
    # FIFO would have run all twenty first.
    assert sum(1 for row in order if row in {job.id for job in heavy}) < 20


async def test_deep_backlogs_with_weights_two_to_one_share_gpu_seconds_two_to_one(
    repository, pool, settings, local_storage, tiny_runners
):
    standard, bulk = uuid4(), uuid4()  # weights 2 and 1
    for _ in range(25):
        await submit(repository, standard, Tier.STANDARD)
        await submit(repository, bulk, Tier.BULK)
    async with wan_worker(repository, local_storage, settings, tiny_runners):

        async def thirty_claimed() -> bool:
            return len(await started_in_order(pool)) >= 30

        await eventually(thirty_claimed, 120, "30 claims")
    window = (await started_in_order(pool))[:30]
    seconds = {
        user: sum(r["cost_s"] for r in window if r["user_id"] == user) for user in (standard, bulk)
    }
    assert abs(seconds[standard] / seconds[bulk] - 2.0) <= 0.3, seconds
    # The measured time is charged too: every finished attempt has its usage row.
    charged = await pool.fetchval(
        "SELECT count(*) FROM gpu_usage g JOIN jobs j ON j.id = g.job_id "
        "WHERE j.status = 'completed' AND g.gpu_seconds > 0"
    )
    completed = await pool.fetchval("SELECT count(*) FROM jobs WHERE status = 'completed'")
    assert charged == completed >= 29


async def test_bulk_jobs_still_run_while_premium_jobs_keep_arriving(
    repository, pool, settings, local_storage, tiny_runners
):
    premium_users = [uuid4(), uuid4()]
    for user in premium_users:
        for _ in range(6):
            await submit(repository, user, Tier.PREMIUM)
    bulk_user = uuid4()
    bulk = [await submit(repository, bulk_user, Tier.BULK) for _ in range(3)]
    stop = asyncio.Event()

    async def keep_arriving() -> None:
        # Premium work never runs out: a new job for each premium user every 0.2 s, faster
        # than the worker runs them. Strict priority would never run a bulk job.
        while not stop.is_set():
            for user in premium_users:
                await submit(repository, user, Tier.PREMIUM)
            await asyncio.sleep(0.2)

    arrivals = asyncio.create_task(keep_arriving())
    try:
        async with wan_worker(repository, local_storage, settings, tiny_runners):

            async def bulk_done() -> bool:
                statuses = await pool.fetch(
                    "SELECT status FROM jobs WHERE id = ANY($1::uuid[])", [j.id for j in bulk]
                )
                return all(row["status"] == "completed" for row in statuses)

            await eventually(bulk_done, 120, "every bulk job completed")
            queued_premium = await pool.fetchval(
                "SELECT count(*) FROM jobs WHERE status = 'queued' AND tier = 'premium'"
            )
    finally:
        stop.set()
        await arrivals
    assert queued_premium > 0, "premium work was still waiting when the bulk jobs ran"
    # Weighted, not equal: premium (weight 4) ran about four jobs per bulk job per user.
    order = await started_in_order(pool)
    last_bulk = max(i for i, row in enumerate(order) if row["user_id"] == bulk_user)
    premium_before = sum(1 for row in order[:last_bulk] if row["tier"] == "premium")
    assert premium_before >= 12, premium_before
