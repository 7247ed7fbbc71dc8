"""Fair order and GPU-time accounting in the queue's SQL, on real PostgreSQL."""

from __future__ import annotations

import asyncio
from uuid import UUID, uuid4

import pytest

from ourvidz_serve.catalog import JOB_TYPES, Tier
from ourvidz_serve.errors import QuotaExhausted
from ourvidz_serve.jobs.planning import plan_job
from ourvidz_serve.jobs.protocol import JobRequest
from ourvidz_serve.persistence.repository import (
    AssetCompletion,
    GpuQuota,
    JobRecord,
    JobRepository,
)

LEASE_S = 30.0
FAST_IMAGE_S = JOB_TYPES["sdxl_image_fast"].expected_time_s


async def submit(
    repository: JobRepository,
    user: UUID,
    *,
    tier: Tier = Tier.STANDARD,
    weight: float = 2.0,
    key: str | None = None,
    quota: GpuQuota | None = None,
    **fields: object,
) -> tuple[JobRecord, bool]:
    body = {"job_type": "sdxl_image_fast", "prompt": "a heron in reeds"} | fields
    plan = plan_job(JobRequest.model_validate(body), user, tier=tier, idempotency_key=key)
    return await repository.insert_job(plan, weight=weight, quota=quota)


async def claim(repository: JobRepository, free: int = 1) -> list[JobRecord]:
    return await repository.claim_jobs("sdxl_queue", free, "w", LEASE_S)


async def test_a_users_jobs_are_spaced_by_their_cost_over_their_weight(repository):
    user = uuid4()
    one, _ = await submit(repository, user, weight=2.0, num_images=1)
    six, _ = await submit(repository, user, weight=2.0, num_images=6)
    after, _ = await submit(repository, user, weight=2.0, num_images=1)
    assert (one.cost_s, six.cost_s) == (FAST_IMAGE_S, 6 * FAST_IMAGE_S)
    assert six.virtual_start - one.virtual_start == pytest.approx(FAST_IMAGE_S / 2)
    assert after.virtual_start - six.virtual_start == pytest.approx(6 * FAST_IMAGE_S / 2)


async def test_batch_mates_join_the_head_in_fair_order_not_arrival_order(repository):
    heavy, light = uuid4(), uuid4()
    heavy_jobs = [(await submit(repository, heavy))[0] for _ in range(6)]
    light_job, _ = await submit(repository, light)
    claimed = {job.id for job in await claim(repository, free=6)}
    # Arrival order would have filled the call with the heavy user's six.
    assert light_job.id in claimed
    assert len(claimed) == 6 and heavy_jobs[-1].id not in claimed


async def test_a_user_returning_to_an_idle_queue_starts_level_with_everyone(repository, pool):
    busy, returning, newcomer = uuid4(), uuid4(), uuid4()
    await submit(repository, returning)
    for _ in range(5):
        await submit(repository, busy)
    while await claim(repository):
        pass  # the queue runs dry
    await pool.execute("UPDATE jobs SET status = 'completed' WHERE status = 'processing'")
    back, _ = await submit(repository, returning)
    new, _ = await submit(repository, newcomer)
    # The busy user's history no longer counts against anyone, nor for the returning user.
    assert back.virtual_start == new.virtual_start


async def test_an_idempotent_replay_does_not_move_the_users_virtual_time(repository, pool):
    user = uuid4()
    first, created = await submit(repository, user, key="k-1")
    replay, replayed = await submit(repository, user, key="k-1")
    assert (created, replayed) == (True, False) and replay.id == first.id
    finish = await pool.fetchval(
        "SELECT virtual_finish FROM fair_shares WHERE user_id = $1 AND queue = 'sdxl_queue'", user
    )
    assert finish == pytest.approx(first.virtual_start + FAST_IMAGE_S / 2)


async def test_concurrent_submissions_with_one_key_advance_the_users_virtual_time_once(
    repository, pool
):
    user = uuid4()
    answers = await asyncio.gather(*(submit(repository, user, key="k-2") for _ in range(8)))
    assert sorted(created for _, created in answers) == [False] * 7 + [True]
    assert len({job.id for job, _ in answers}) == 1
    finish = await pool.fetchval(
        "SELECT virtual_finish FROM fair_shares WHERE user_id = $1 AND queue = 'sdxl_queue'", user
    )
    assert finish == pytest.approx(answers[0][0].virtual_start + FAST_IMAGE_S / 2)


async def test_outcomes_charge_what_ran_and_nothing_when_fenced_out(repository, pool):
    user = uuid4()
    done, failed, cancelled, stale = [(await submit(repository, user))[0] for _ in range(4)]
    for job in (done, failed, cancelled, stale):
        [held] = await claim(repository)
        assert held.id == job.id
    completions = [AssetCompletion(a.index, a.path, {}) for a in done.assets]
    assert await repository.complete_job(done.id, 1, {}, completions, gpu_seconds=2.5)
    assert await repository.fail_job(failed.id, 1, "boom", "RuntimeError", {}, gpu_seconds=1.25)
    await repository.cancel_job(cancelled.id)
    assert await repository.record_cancelled_stop(cancelled.id, 1, {"stopped_at_step": 3}, 0.5)
    # An attempt that lost its job records nothing and is charged nothing.
    assert not await repository.fail_job(stale.id, 7, "late", "RuntimeError", {}, gpu_seconds=9)
    charges = dict(await pool.fetch("SELECT job_id, gpu_seconds FROM gpu_usage"))
    assert charges == {done.id: 2.5, failed.id: 1.25, cancelled.id: 0.5}
    usage = await repository.gpu_usage(user, GpuQuota(budget_s=100, window_s=60))
    assert usage.spent_s == pytest.approx(4.25)
    assert usage.reserved_s == pytest.approx(FAST_IMAGE_S)  # the stale one is still running


async def test_a_refusal_says_when_enough_charges_leave_the_window(repository, pool):
    user = uuid4()
    window_s = 600.0
    job, _ = await submit(repository, user)
    await pool.execute("UPDATE jobs SET status = 'completed' WHERE id = $1", job.id)
    # Charged 500 s and 100 s ago: the older charge leaves the window in about 100 s.
    await pool.executemany(
        "INSERT INTO gpu_usage (job_id, attempt, user_id, queue, tier, gpu_seconds, charged_at) "
        "VALUES ($1, $2, $3, 'sdxl_queue', 'standard', $4, "
        "clock_timestamp() - make_interval(secs => $5))",
        [(job.id, 1, user, 6.0, 500.0), (job.id, 2, user, 6.0, 100.0)],
    )
    quota = GpuQuota(budget_s=12.0, window_s=window_s)
    with pytest.raises(QuotaExhausted) as refused:
        await submit(repository, user, quota=quota)
    assert refused.value.retry_after_s == pytest.approx(100.0, abs=2.0)
    assert refused.value.details["spent_gpu_seconds"] == 12.0
    # Nothing of the refused job was written, and its user's virtual time did not move.
    assert await pool.fetchval("SELECT count(*) FROM jobs WHERE user_id = $1", user) == 1


async def test_a_newly_active_user_goes_before_the_jobs_queued_behind_the_one_running(
    repository,
):
    heavy, light = uuid4(), uuid4()
    heavy_jobs = [(await submit(repository, heavy))[0] for _ in range(7)]
    [running] = await claim(repository)
    assert running.id == heavy_jobs[0].id
    light_job, _ = await submit(repository, light)
    # Level with the job in service, so strictly ahead of the six still queued.
    assert light_job.virtual_start == running.virtual_start
    [following] = await claim(repository)
    assert following.id == light_job.id
