"""PostgreSQL behind PgBouncer in transaction mode (as Supabase's port 6543): the pool goes
through the pooler, migrations and LISTEN take the direct connection, and callbacks are owed
by the job, not by a session parameter that no pooler carries."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import asyncpg
import pytest

from ourvidz_serve.jobs.planning import plan_job
from ourvidz_serve.jobs.protocol import JobRequest
from ourvidz_serve.persistence.database import migrate_direct, open_database
from ourvidz_serve.persistence.migrations import DEFAULT_MIGRATIONS_DIR, load_migrations
from ourvidz_serve.persistence.repository import AssetCompletion, JobRepository
from ourvidz_serve.settings import Settings
from tests.support.databases import new_database
from tests.support.pgbouncer import PgBouncer, running_pgbouncer
from tests.support.waiting import until

USER = UUID("6f1c1f38-5b8e-4a52-8f8e-0c9a6f0d2b11")
LEASE_S = 30.0


@pytest.fixture(scope="module")
def bouncer(database_url: str) -> Iterator[PgBouncer]:
    # Two server connections for up to ten clients: every statement of the pool shares one,
    # so anything that leans on the session (a named prepared statement) breaks at once.
    with running_pgbouncer(database_url, pool_size=2) as running:
        yield running


def plan(job_type: str = "sdxl_image_fast", **fields):
    body = {"job_type": job_type, "prompt": "a lantern on a pier"} | fields
    return plan_job(JobRequest.model_validate(body), USER)


async def test_the_queue_and_callbacks_work_through_a_transaction_mode_pooler(
    bouncer: PgBouncer, database_url: str, pool: asyncpg.Pool
):
    await pool.execute("TRUNCATE jobs, images, videos, rate_limits, callback_deliveries")
    settings = Settings(
        database_url=bouncer.url(), database_direct_url=database_url, db_pool_max_size=10
    )
    before = bouncer.stats().get("total_query_count", 0)
    async with open_database(settings) as pooled:
        repository = JobRepository(pooled, direct_dsn=settings.database_direct_url)
        queued: list[str] = []
        cancelled: list[UUID] = []
        listening = asyncio.create_task(repository.listen(queued.append, cancelled.append))
        try:
            # A NOTIFY sent through the pooler reaches the listener on the direct session.
            async def probe_arrived() -> bool:
                await pooled.execute("SELECT pg_notify('ourvidz_jobs_queued', 'probe')")
                return "probe" in queued

            await until(probe_arrived, 10.0, "LISTEN on the direct connection", poll_s=0.05)

            # Many clients at once over two server connections: submissions with and without
            # a callback owed, each statement prepared afresh (statement_cache_size=0).
            owed = await asyncio.gather(
                *(repository.insert_job(plan(num_images=3), owes_callback=True) for _ in range(4))
            )
            not_owed = await asyncio.gather(
                *(repository.insert_job(plan("image_fast")) for _ in range(4))
            )
            to_cancel, _ = await repository.insert_job(plan(), owes_callback=True)
            await until(
                lambda: _true(queued.count("sdxl_queue") >= 5 and "wan_queue" in queued),
                10.0,
                "the submissions' notifications",
                poll_s=0.05,
            )

            assert await repository.cancel_job(to_cancel.id) is not None
            sdxl = await repository.claim_jobs("sdxl_queue", 12, "pooled-worker", LEASE_S)
            wan = await repository.claim_jobs("wan_queue", 4, "pooled-worker", LEASE_S)
            assert {job.id for job in sdxl} == {job.id for job, _ in owed}
            assert {job.id for job in wan} == {job.id for job, _ in not_owed}
            # Complete half of each kind, fail the other half.
            for index, job in enumerate([*sdxl, *wan]):
                if index % 2 == 0:
                    completions = [
                        AssetCompletion(a.index, a.path, {"written_by": "pooled"})
                        for a in job.assets
                    ]
                    assert await repository.complete_job(job.id, job.attempts, {}, completions)
                else:
                    assert await repository.fail_job(job.id, job.attempts, "boom", "test_error", {})
            statuses = dict(await pooled.fetch("SELECT id, status FROM jobs"))
            assert sorted(statuses.values()) == ["cancelled"] + ["completed"] * 4 + ["failed"] * 4

            # The pool's statements run on PgBouncer's server connections; the listener's
            # session is not one of them.
            servers = bouncer.server_pids()
            assert await pooled.fetchval("SELECT pg_backend_pid()") in servers
            listener = await pool.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN %' LIMIT 1"
            )
            assert listener is not None and listener not in servers
        finally:
            listening.cancel()
            with pytest.raises(asyncio.CancelledError):
                await listening

    # One delivery row per job that owed one, for whatever end it had; none for the others.
    deliveries = await pool.fetch("SELECT job_id, event FROM callback_deliveries")
    expected = {(job.id, f"job.{statuses[job.id]}") for job, _ in owed}
    assert {(row["job_id"], row["event"]) for row in deliveries} == expected | {
        (to_cancel.id, "job.cancelled")
    }
    # The statements went through PgBouncer: its counters grew by at least one per call.
    assert bouncer.stats()["total_query_count"] - before >= 9 + 9 + 2


async def test_without_a_direct_url_the_pool_still_works_through_the_pooler(
    bouncer: PgBouncer, pool: asyncpg.Pool
):
    """Only ``OURVIDZ_DATABASE_URL`` (the pooler): no startup parameter is sent, so the pooler
    accepts the connections, and no statement depends on a prepared-statement cache."""
    await pool.execute("TRUNCATE jobs, images, videos, rate_limits, callback_deliveries")
    settings = Settings(database_url=bouncer.url())
    async with open_database(settings) as pooled:
        repository = JobRepository(pooled)
        for _ in range(3):
            job, created = await repository.insert_job(plan(), owes_callback=True)
            assert created
            assert await repository.get_job(job.id) is not None
        assert await pooled.fetchval("SELECT pg_backend_pid()") in bouncer.server_pids()


async def test_an_upgrade_keeps_the_callbacks_that_unfinished_jobs_were_submitted_with(
    database_url: str, tmp_path: Path
):
    """Before 0007 a job owed its callback by the session that ended it; the jobs still queued
    or running at the upgrade of a service with a callback URL owe theirs afterwards."""
    async with new_database(database_url, "upgrade") as (_name, dsn):
        released = tmp_path / "released"
        released.mkdir()
        for migration in load_migrations():
            if migration.version < 7:
                path = released / f"{migration.version:04d}_{migration.name}.sql"
                path.write_text(migration.sql)
        settings = Settings(callback_url="http://127.0.0.1:9/hooks", callback_secret="s")
        await migrate_direct(dsn, settings, released)
        connection = await asyncpg.connect(dsn)
        try:
            for status in ("queued", "processing", "completed"):
                await connection.execute(
                    "INSERT INTO jobs (user_id, job_type, format, quality, model_type, queue, "
                    "batch_key, status) VALUES ($1, 'sdxl_image_fast', 'png', 'fast', 'sdxl', "
                    "'sdxl_queue', 'k', $2)",
                    USER,
                    status,
                )
            applied, _ = await migrate_direct(dsn, settings, DEFAULT_MIGRATIONS_DIR)
            assert 7 in applied
            owes = dict(await connection.fetch("SELECT status, owes_callback FROM jobs"))
            # A replica of the previous version, still submitting during a rolling upgrade,
            # names no owes_callback: the default follows its session parameter, as 0005 did.
            insert_as_before = (
                "INSERT INTO jobs (user_id, job_type, format, quality, model_type, queue, "
                "batch_key) VALUES ($1, 'sdxl_image_fast', 'png', 'fast', 'sdxl', "
                "'sdxl_queue', 'k') RETURNING owes_callback"
            )
            assert not await connection.fetchval(insert_as_before, USER)
            await connection.execute("SET ourvidz.callbacks = 'on'")
            assert await connection.fetchval(insert_as_before, USER)
        finally:
            await connection.close()
        assert owes == {"queued": True, "processing": True, "completed": False}


async def test_migrations_apply_exactly_once_through_the_transaction_pooler_alone(
    bouncer: PgBouncer, database_url: str
):
    """Without a direct URL, replicas starting together migrate through the pooler: the lock
    is the transaction's, so it is taken and released on the one server connection."""
    async with new_database(database_url, "pooled") as (name, _dsn):
        pooled_dsn = bouncer.url(name)
        results = await asyncio.gather(*(migrate_direct(pooled_dsn, Settings()) for _ in range(3)))
        applied = sorted(version for versions, _ in results for version in versions)
        expected = [migration.version for migration in load_migrations()]
        assert applied == expected, "each migration applied once, by one of the three"
        recorded = [row["version"] for row in results[0][1]]
        assert recorded == expected


async def _true(value: object) -> bool:
    return bool(value)
