"""Each background loop outlives an error that is not an outage, with a real PostgreSQL.

The test holds a lock the loop's statement needs, waits until that statement waits on it, and
cancels it with ``pg_cancel_backend`` (``QueryCanceledError``, as a ``statement_timeout``,
a ``lock_timeout`` or an operator would). Before the loops ran supervised, such an error ended
the loop for good and nobody heard of it; now the loop runs again and does its work.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

import asyncpg
import pytest
from pydantic import SecretStr

from ourvidz_serve.catalog import Queue
from ourvidz_serve.domain import JobStatus
from ourvidz_serve.persistence.repository import JobRecord, JobRepository
from ourvidz_serve.settings import Settings
from ourvidz_serve.storage.local import LocalStorage
from ourvidz_serve.workers.callbacks import deliverer_from_settings
from ourvidz_serve.workers.handlers import JobResult, RunControl
from ourvidz_serve.workers.supervision import Supervisor
from ourvidz_serve.workers.worker import QueueWorker, WorkerConfig
from tests.support.webhook_receiver import webhook_receiver
from tests.workers.test_worker import HeldHandler, eventually, plan, worker

FAST_LOOPS = {
    "heartbeat_interval_s": 0.2,
    "reaper_interval_s": 0.2,
    "lease_s": 30.0,
    "loop_restart_max_s": 0.2,
}


@contextlib.asynccontextmanager
async def locked(pool: asyncpg.Pool, table: str) -> AsyncIterator[None]:
    """Hold ``table`` in ACCESS EXCLUSIVE mode: every statement on it waits."""
    async with pool.acquire() as connection:
        transaction = connection.transaction()
        await transaction.start()
        await connection.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            await transaction.rollback()


async def cancel_waiting_statement(pool: asyncpg.Pool, fragment: str) -> None:
    """Cancel the statement (containing ``fragment``) that waits on a lock."""
    async with asyncio.timeout(15):
        while True:
            pid = await pool.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND position($1 in query) > 0 AND pid <> pg_backend_pid() LIMIT 1",
                fragment,
            )
            if pid is not None:
                assert await pool.fetchval("SELECT pg_cancel_backend($1)", pid)
                return
            await asyncio.sleep(0.02)


async def lease_of(pool: asyncpg.Pool, job_id) -> datetime:
    lease: datetime = await pool.fetchval("SELECT lease_expires_at FROM jobs WHERE id=$1", job_id)
    return lease


async def restarted(w: QueueWorker, loop: str) -> bool:
    return bool(w.loops()[loop]["restarts"] >= 1)


async def test_the_heartbeat_renews_leases_again_after_its_statement_is_cancelled(
    repository, pool, settings, local_storage: LocalStorage
):
    job, _ = await repository.insert_job(plan())
    handler = HeldHandler()
    async with worker(repository, local_storage, handler, settings, **FAST_LOOPS) as w:
        await asyncio.wait_for(handler.claimed.get(), timeout=10)
        async with locked(pool, "jobs"):
            await cancel_waiting_statement(pool, "FROM held")
        await eventually(lambda: restarted(w, "heartbeat"), 5, "the heartbeat failed once")
        before = await lease_of(pool, job.id)

        async def moved() -> bool:
            return await lease_of(pool, job.id) > before

        await eventually(moved, 5, "the lease moving forward")
        assert w.lease_problems() == []
        handler.release.set()


async def test_the_reaper_reaps_again_after_its_statement_is_cancelled(
    repository, pool, settings, local_storage: LocalStorage
):
    # The worker serves the WAN queue: the SDXL job it reaps stays queued for the test to see.
    wan_worker = {"queue": Queue.WAN.value, "units_per_claim": 1} | FAST_LOOPS
    async with worker(repository, local_storage, HeldHandler(), settings, **wan_worker) as w:
        async with locked(pool, "jobs"):
            await cancel_waiting_statement(pool, "reaped AS")
        await eventually(lambda: restarted(w, "reaper"), 5, "the reaper failed once")
        job, _ = await repository.insert_job(plan())
        [orphan] = await repository.claim_jobs("sdxl_queue", 6, "dead-replica", 30)
        await pool.execute(
            "UPDATE jobs SET lease_expires_at = clock_timestamp() - interval '1 s' WHERE id=$1",
            job.id,
        )

        async def reaped() -> bool:
            current = await repository.get_job(job.id)
            return current is not None and current.status is JobStatus.QUEUED

        await eventually(reaped, 5, "the orphaned lease reaped")
        assert orphan.attempts == 1


async def test_the_backlog_updates_again_after_its_statement_is_cancelled(
    repository, pool, settings, local_storage: LocalStorage
):
    idle = {"queue": Queue.WAN.value, "units_per_claim": 1, "max_calls": 0} | FAST_LOOPS
    async with worker(repository, local_storage, HeldHandler(), settings, **idle) as w:
        async with locked(pool, "jobs"):
            await cancel_waiting_statement(pool, "AS head")
        await eventually(lambda: restarted(w, "backlog"), 5, "the backlog loop failed once")
        for _ in range(3):
            await repository.insert_job(plan("video_fast"))

        async def counted() -> bool:
            return w.load()[0] == 3

        await eventually(counted, 5, "the backlog counting the new jobs")


async def test_the_callback_deliverer_delivers_again_after_its_statement_is_cancelled(
    repository: JobRepository, pool, settings: Settings
):
    secret = "a callback secret of the loop tests"
    with webhook_receiver(secret.encode()) as receiver:
        configured = settings.model_copy(
            update={
                "callback_url": receiver.url,
                "callback_secret": SecretStr(secret),
                "callback_poll_interval_s": 0.05,
            }
        )
        deliverer = deliverer_from_settings(repository, configured)
        assert deliverer is not None
        supervisor = Supervisor(restart_max_s=0.2, stall_s=60)
        supervisor.every("callbacks", 0, deliverer.round)
        try:
            async with locked(pool, "callback_deliveries"):
                await cancel_waiting_statement(pool, "callback_deliveries")

            async def failed_once() -> bool:
                return bool(supervisor.report()["callbacks"]["restarts"] >= 1)

            await eventually(failed_once, 5, "the deliverer failed once")
            job, _ = await repository.insert_job(plan())
            await pool.execute(
                "INSERT INTO callback_deliveries (job_id, event, webhook_id) "
                "VALUES ($1, 'job.completed', $2)",
                job.id,
                f"{job.id}.completed",
            )

            async def delivered() -> bool:
                return bool(receiver.verified())

            await eventually(delivered, 10, "the callback delivered")
            assert receiver.verified()[0]["payload"]["job_id"] == str(job.id)
        finally:
            await supervisor.stop()
            await deliverer.aclose()


async def test_a_worker_whose_heartbeat_keeps_failing_reports_its_unrenewed_leases(
    repository, pool, settings, local_storage: LocalStorage
):
    """Held leases not renewed for half a lease are a health problem (the deployment's
    check_health raises on it while the database answers). The heartbeat's own failures are
    passing ones (cancelled statements): not a loop problem on their own."""
    job, _ = await repository.insert_job(plan())
    handler = HeldHandler()
    config = FAST_LOOPS | {"lease_s": 1.0, "loop_stall_s": 0.5}
    async with worker(repository, local_storage, handler, settings, **config) as w:
        await asyncio.wait_for(handler.claimed.get(), timeout=10)
        assert w.lease_problems() == []
        async with locked(pool, "jobs"):
            for _ in range(4):
                await cancel_waiting_statement(pool, "FROM held")
            [problem] = w.lease_problems()
            assert w.loops()["heartbeat"]["failures"] >= 3
        assert "the leases of 1 held jobs were last renewed" in problem
        handler.release.set()
    current = await repository.get_job(job.id)
    assert current is not None


class SteppingHandler:
    """Reports one more denoising step every 20 ms until released, then fails its jobs."""

    def __init__(self) -> None:
        self.claimed = asyncio.Event()
        self.release = asyncio.Event()

    async def run(self, jobs: Sequence[JobRecord], control: Any = None) -> list[JobResult]:
        assert isinstance(control, RunControl)
        self.claimed.set()
        step = 0
        while not self.release.is_set():
            step += 1
            for job in jobs:
                control.report_progress(job.id, job.attempts, step, 10_000)
            await asyncio.sleep(0.02)
        return [RuntimeError("released by the test")] * len(jobs)


async def test_the_claim_loop_claims_again_after_its_statement_is_cancelled(
    repository, pool, settings, local_storage: LocalStorage
):
    handler = HeldHandler()
    async with worker(repository, local_storage, handler, settings, **FAST_LOOPS) as w:
        async with locked(pool, "jobs"):
            await cancel_waiting_statement(pool, "WITH head AS")
        await eventually(lambda: restarted(w, "claim"), 5, "the claim loop failed once")
        job, _ = await repository.insert_job(plan())
        [claimed] = await asyncio.wait_for(handler.claimed.get(), timeout=10)
        assert claimed.id == job.id
        handler.release.set()


async def test_the_progress_loop_records_again_after_its_statement_is_cancelled(
    repository, pool, settings, local_storage: LocalStorage
):
    job, _ = await repository.insert_job(plan())
    handler = SteppingHandler()
    async with worker(repository, local_storage, handler, settings, **FAST_LOOPS) as w:
        await asyncio.wait_for(handler.claimed.wait(), timeout=10)
        async with locked(pool, "jobs"):
            await cancel_waiting_statement(pool, "running AS")
        await eventually(lambda: restarted(w, "progress"), 5, "the progress loop failed once")
        before = await pool.fetchval(
            "SELECT (progress->>'step')::int FROM jobs WHERE id=$1", job.id
        )

        async def advanced() -> bool:
            step = await pool.fetchval(
                "SELECT (progress->>'step')::int FROM jobs WHERE id=$1", job.id
            )
            return step is not None and step > (before or 0)

        await eventually(advanced, 5, "progress recorded again")
        handler.release.set()


async def test_listen_comes_back_after_its_session_is_terminated(
    repository, pool, settings, local_storage: LocalStorage
):
    """A terminated LISTEN session is listened again: a cancel still reaches the worker at
    once (its heartbeat, the other way it would learn, is 20 s away)."""
    job, _ = await repository.insert_job(plan())
    handler = HeldHandler()
    slow_heartbeat = FAST_LOOPS | {"heartbeat_interval_s": 20.0, "lease_s": 60.0}
    async with worker(repository, local_storage, handler, settings, **slow_heartbeat) as w:
        await asyncio.wait_for(handler.claimed.get(), timeout=10)
        listening = "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN %' LIMIT 1"
        first = await pool.fetchval(listening)
        assert first is not None
        assert await pool.fetchval("SELECT pg_terminate_backend($1)", first)

        async def listening_again() -> bool:
            pid = await pool.fetchval(listening)
            return pid is not None and pid != first

        await eventually(listening_again, 10, "LISTEN again on a new session")
        assert await repository.cancel_job(job.id) is JobStatus.PROCESSING

        async def told() -> bool:
            return (job.id, 1) in w._cancelled

        await eventually(told, 3, "the cancel reaching the worker")
        handler.release.set()


def test_the_renewal_limit_is_half_a_lease_and_a_heartbeat_fits_in_it():
    config = WorkerConfig.for_queue(Settings(), Queue.SDXL)
    assert config.lease_renewal_limit_s == config.lease_s / 2 > config.heartbeat_interval_s
    with pytest.raises(ValueError, match="heartbeat_interval_s must be shorter than half"):
        Settings(lease_s=3.0, heartbeat_interval_s=1.5)
