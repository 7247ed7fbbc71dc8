"""The dispatcher over real PostgreSQL: capacity, wake-ups by NOTIFY, and no double claims."""

import asyncio
from uuid import UUID

from ourvidz_serve.dispatch.dispatcher import Dispatcher
from ourvidz_serve.jobs.planning import plan_job
from ourvidz_serve.jobs.protocol import JobRequest, JobStatus
from ourvidz_serve.persistence.repository import AssetCompletion, JobRecord, JobRepository

USER = UUID("6f1c1f38-5b8e-4a52-8f8e-0c9a6f0d2b11")


def plan(job_type: str = "sdxl_image_fast"):
    request = JobRequest.model_validate({"job_type": job_type, "prompt": "a quiet harbour"})
    return plan_job(request, USER)


async def statuses(repository: JobRepository) -> list[str]:
    rows = await repository.pool.fetch("SELECT status FROM jobs ORDER BY created_at")
    return [row["status"] for row in rows]


async def eventually(predicate, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_jobs_beyond_capacity_stay_queued_in_the_database(repository):
    release = asyncio.Event()
    started: list[UUID] = []

    async def run(job: JobRecord) -> None:
        started.append(job.id)
        await release.wait()
        await repository.complete_job(
            job.id, {}, [AssetCompletion(a.index, a.path, {}) for a in job.assets]
        )

    dispatcher = Dispatcher(repository, run, {"sdxl_queue": 2, "wan_queue": 1}, 5.0)
    await dispatcher.start()
    try:
        for _ in range(5):
            await repository.insert_job(plan())

        async def two_running() -> bool:
            return sorted(await statuses(repository)) == ["processing"] * 2 + ["queued"] * 3

        await eventually(two_running)
        assert dispatcher.in_flight() == {"sdxl_queue": 2, "wan_queue": 0}
        release.set()

        async def all_done() -> bool:
            return await statuses(repository) == ["completed"] * 5

        await eventually(all_done)
        assert len(started) == len(set(started)) == 5
    finally:
        await dispatcher.stop()


async def test_a_submission_wakes_the_dispatcher_without_waiting_for_the_poll(repository):
    done = asyncio.Event()

    async def run(job: JobRecord) -> None:
        await repository.fail_job(job.id, "stop here", "Probe", {})
        done.set()

    # A poll interval far longer than the wait below: only NOTIFY can wake it in time.
    dispatcher = Dispatcher(repository, run, {"sdxl_queue": 1, "wan_queue": 1}, 60.0)
    await dispatcher.start()
    try:
        await asyncio.sleep(0.2)
        job, _ = await repository.insert_job(plan("video_fast"))
        await asyncio.wait_for(done.wait(), timeout=5)
        failed = await repository.get_job(job.id)
        assert failed is not None and failed.status is JobStatus.FAILED
    finally:
        await dispatcher.stop()


async def test_two_dispatchers_share_the_queue_without_running_a_job_twice(repository):
    runs: list[UUID] = []
    release = asyncio.Event()

    async def run(job: JobRecord) -> None:
        runs.append(job.id)
        await release.wait()
        await repository.complete_job(
            job.id, {}, [AssetCompletion(a.index, a.path, {}) for a in job.assets]
        )

    capacities = {"sdxl_queue": 3, "wan_queue": 1}
    dispatchers = [Dispatcher(repository, run, capacities, 0.1) for _ in range(2)]
    for dispatcher in dispatchers:
        await dispatcher.start()
    try:
        for _ in range(12):
            await repository.insert_job(plan())

        async def six_running() -> bool:
            return (await statuses(repository)).count("processing") == 6

        # Each dispatcher runs at most 3, so six at once means both took their share.
        await eventually(six_running)
        assert [d.in_flight()["sdxl_queue"] for d in dispatchers] == [3, 3]
        release.set()

        async def all_done() -> bool:
            return await statuses(repository) == ["completed"] * 12

        await eventually(all_done)
        assert len(runs) == len(set(runs)) == 12
    finally:
        for dispatcher in dispatchers:
            await dispatcher.stop()
