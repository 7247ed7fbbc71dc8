"""Adapter-aware claims on real PostgreSQL: a replica prefers jobs whose LoRAs it holds, for
no longer than the affinity's wait limit, and only jobs with the same LoRAs share a call."""

from __future__ import annotations

from uuid import UUID

import asyncpg

from ourvidz_serve.jobs.planning import plan_job
from ourvidz_serve.jobs.protocol import JobRequest
from ourvidz_serve.persistence.repository import AdapterAffinity, JobRecord, JobRepository

LEASE_S = 30.0
X, Y, Z = "a" * 64, "b" * 64, "c" * 64
"""Content digests of three LoRAs."""
DIGESTS = {"x": X, "y": Y, "z": Z}
USER = UUID(int=1)
"""One user's jobs: their fair order is the order they were submitted in."""


async def submit(
    repository: JobRepository, *loras: tuple[str, float], user: UUID = USER
) -> JobRecord:
    body = {
        "job_type": "sdxl_image_fast",
        "prompt": "a heron in reeds",
        "loras": [{"name": name, "scale": scale} for name, scale in loras],
    }
    plan = plan_job(JobRequest.model_validate(body), user, lora_digests=DIGESTS)
    job, _ = await repository.insert_job(plan)
    return job


async def claim(
    repository: JobRepository,
    held: list[str],
    *,
    cached: list[str] | None = None,
    max_wait_s: float = 30.0,
    window: int = 16,
) -> list[JobRecord]:
    """Claim with ``held`` active in the pipeline and ``cached`` (default: the same) in CPU."""
    affinity = AdapterAffinity(
        active=held, cached=held if cached is None else cached, max_wait_s=max_wait_s, window=window
    )
    return await repository.claim_jobs("sdxl_queue", 6, "w", LEASE_S, affinity)


async def age(pool: asyncpg.Pool, job: JobRecord, seconds: float) -> None:
    """Make ``job`` look submitted ``seconds`` ago."""
    await pool.execute(
        "UPDATE jobs SET created_at = clock_timestamp() - make_interval(secs => $2) WHERE id = $1",
        job.id,
        seconds,
    )


async def test_a_job_records_its_loras_digests_and_a_batch_key_with_their_scales(repository, pool):
    job = await submit(repository, ("x", 0.5), ("y", 1.0))
    assert job.metadata["loras"] == [
        {"name": "x", "scale": 0.5, "digest": X},
        {"name": "y", "scale": 1.0, "digest": Y},
    ]
    [row] = await pool.fetch("SELECT adapters, batch_key FROM jobs")
    assert sorted(row["adapters"]) == [X, Y]
    assert row["batch_key"] == f"sdxl_image_fast:loras:{X}@0.5,{Y}@1.0"


async def test_held_loras_go_before_older_jobs_that_would_need_a_load(repository, pool):
    older = await submit(repository, ("y", 1.0))
    await age(pool, older, 10)
    held = await submit(repository, ("x", 1.0))
    [claimed] = await claim(repository, held=[X], max_wait_s=30)
    assert claimed.id == held.id
    [then] = await claim(repository, held=[X], max_wait_s=30)
    assert then.id == older.id  # nothing held is left: fair order again


async def test_a_job_that_waited_past_the_limit_runs_next_whatever_is_held(repository, pool):
    waited = await submit(repository, ("y", 1.0))
    await age(pool, waited, 31)
    await submit(repository, ("x", 1.0))
    [claimed] = await claim(repository, held=[X], max_wait_s=30)
    assert claimed.id == waited.id


async def test_cached_loras_go_before_loras_that_need_a_download(repository):
    unheld = await submit(repository, ("z", 1.0))
    cached = await submit(repository, ("y", 1.0))
    active = await submit(repository, ("x", 1.0))
    order = [(await claim(repository, held=[X], cached=[X, Y]))[0].id for _ in range(3)]
    assert order == [active.id, cached.id, unheld.id]


async def test_a_job_without_loras_needs_none_so_it_counts_as_held(repository, pool):
    lora_job = await submit(repository, ("y", 1.0))
    await age(pool, lora_job, 5)
    plain = await submit(repository)
    [claimed] = await claim(repository, held=[])
    assert claimed.id == plain.id


async def test_nothing_held_near_the_head_claims_in_fair_order(repository, pool):
    first = await submit(repository, ("y", 1.0))
    await submit(repository, ("x", 1.0))
    [claimed] = await claim(repository, held=["c" * 64])
    assert claimed.id == first.id


async def test_the_preference_looks_only_at_the_window_at_the_head(repository, pool):
    head = [await submit(repository, ("y", 1.0)) for _ in range(2)]
    await submit(repository, ("x", 1.0))
    claimed = await claim(repository, held=[X], window=2)
    assert {job.id for job in claimed} == {job.id for job in head}  # the held job's batch-mates


async def test_only_jobs_with_the_same_loras_and_scales_share_a_call(repository):
    same = [await submit(repository, ("x", 1.0)) for _ in range(2)]
    await submit(repository, ("x", 0.5))
    await submit(repository, ("y", 1.0))
    await submit(repository)
    claimed = await claim(repository, held=[X])
    assert {job.id for job in claimed} == {job.id for job in same}


async def test_without_an_affinity_claims_keep_plain_fair_order(repository, pool):
    first = await submit(repository, ("y", 1.0))
    await submit(repository, ("x", 1.0))
    [claimed] = await repository.claim_jobs("sdxl_queue", 6, "w", LEASE_S)
    assert claimed.id == first.id
