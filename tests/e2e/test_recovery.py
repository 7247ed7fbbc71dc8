"""Nothing is lost: replicas SIGKILLed mid-job, and the SDXL deployment scaled on its backlog.

Runs against the session's ``serve run`` (short leases: see conftest). A killed model
replica's jobs come back when its lease expires; a killed ingress held no job at all.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from uuid import uuid4

import asyncpg
import httpx
import pytest

from tests.e2e.conftest import ServiceDatabase
from tests.e2e.test_serve_lifecycle import finished, submit
from tests.launcher import RunningService, replica_pids

pytestmark = pytest.mark.e2e


def pid_of(claimed_by: str) -> int:
    """The worker id is ``deployment:replica@host:pid``."""
    return int(claimed_by.rsplit(":", 1)[1])


async def kill_the_replica_running_one_of(
    service_db: asyncpg.Connection, job_ids: list[str], timeout_s: float = 120
) -> tuple[str, int]:
    """SIGKILL the process holding the first of these jobs seen processing."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = await service_db.fetchrow(
            "SELECT id::text, claimed_by FROM jobs "
            "WHERE id = ANY($1::uuid[]) AND status = 'processing' LIMIT 1",
            job_ids,
        )
        if row is not None:
            pid = pid_of(row["claimed_by"])
            os.kill(pid, signal.SIGKILL)
            return row["id"], pid
        await asyncio.sleep(0.02)
    raise AssertionError("no job was seen processing")


async def assert_completed_with_exactly_their_assets(
    http: httpx.AsyncClient, service: RunningService, submitted: list[dict]
) -> list[dict]:
    done = await asyncio.gather(*(finished(http, job["id"], timeout_s=300) for job in submitted))
    for before, after in zip(submitted, done, strict=True):
        assert after["status"] == "completed", (after["job_type"], after["error_message"])
        # Same rows as at submission: a re-run updated them, never inserted more.
        assert [a["id"] for a in after["assets"]] == [a["id"] for a in before["assets"]]
        assert len(after["assets"]) == after["metadata"]["num_images"]
        for asset in after["assets"]:
            assert asset["status"] == "completed"
            stored = service.data_dir / "storage" / asset["bucket"] / asset["path"]
            assert stored.stat().st_size > 0
        assert after["metadata"]["attempt"] == after["attempts"]
    return done


async def test_a_backlog_of_sdxl_jobs_raises_the_sdxl_replica_count(
    http: httpx.AsyncClient, service: RunningService, service_db: asyncpg.Connection
):
    # An earlier test's backlog may have scaled SDXL up: wait for the downscale delay (30 s).
    deadline = time.monotonic() + 150
    while len(replica_pids(service, "SDXL")) != 1:
        assert time.monotonic() < deadline, "SDXL never settled at one replica"
        await asyncio.sleep(1)
    user = str(uuid4())

    async def burst(jobs: int) -> list[dict]:
        return await asyncio.gather(
            *(
                submit(http, job_type="sdxl_image_fast", num_images=6, user_id=user)
                for _ in range(jobs)
            )
        )

    started = time.monotonic()
    backlog = await burst(12)  # 72 images: the policy asks for ceil(72 / 6) -> max 2
    deadline = time.monotonic() + 150
    while len(replica_pids(service, "SDXL")) < 2:
        assert time.monotonic() < deadline, "the SDXL deployment never scaled up"
        await asyncio.sleep(1)
    # Whatever is left of the first burst, a second one finds both replicas up.
    print(f"scaled to 2 SDXL replicas {time.monotonic() - started:.1f}s after the backlog")
    jobs = backlog + await burst(4)
    await assert_completed_with_exactly_their_assets(http, service, jobs)
    workers = await service_db.fetchval(
        "SELECT count(DISTINCT split_part(claimed_by, '@', 1)) FROM jobs WHERE user_id = $1::uuid",
        user,
    )
    assert workers == 2, "both SDXL replicas claimed from the backlog"


async def test_a_model_replica_killed_mid_job_loses_nothing(
    http: httpx.AsyncClient, service: RunningService, service_db: asyncpg.Connection
):
    jobs = await asyncio.gather(
        *(submit(http, job_type="video_fast", seed=seed) for seed in range(3)),
        *(submit(http, job_type="sdxl_image_fast", num_images=3) for _ in range(3)),
    )
    killed_job, pid = await kill_the_replica_running_one_of(
        service_db, [job["id"] for job in jobs[:3]]
    )
    done = await assert_completed_with_exactly_their_assets(http, service, jobs)
    [rerun] = [job for job in done if job["id"] == killed_job]
    assert rerun["attempts"] >= 2, "the killed attempt is counted"
    assert pid not in replica_pids(service, "WAN"), "Serve replaced the killed replica"


async def test_an_sdxl_replica_killed_mid_batch_loses_nothing(
    http: httpx.AsyncClient, service: RunningService, service_db: asyncpg.Connection
):
    jobs = await asyncio.gather(
        *(submit(http, job_type="sdxl_image_high", num_images=6) for _ in range(4)),
        *(submit(http, job_type="sdxl_image_high", num_images=1) for _ in range(4)),
    )
    killed_job, _ = await kill_the_replica_running_one_of(service_db, [job["id"] for job in jobs])
    done = await assert_completed_with_exactly_their_assets(http, service, jobs)
    [rerun] = [job for job in done if job["id"] == killed_job]
    assert rerun["attempts"] >= 2


async def test_an_ingress_killed_with_jobs_in_flight_loses_nothing(
    http: httpx.AsyncClient, service: RunningService, service_db: asyncpg.Connection
):
    jobs = await asyncio.gather(
        submit(http, job_type="video_fast"),
        submit(http, job_type="image7b_fast_enhanced"),
        *(submit(http, job_type="sdxl_image_fast", num_images=6) for _ in range(3)),
    )
    ingresses = replica_pids(service, "Ingress")
    assert len(ingresses) == 2
    for ingress in ingresses:
        os.kill(ingress, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:
        try:
            if (await http.get("/readyz")).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the ingress did not come back"
        await asyncio.sleep(0.5)
    assert not set(replica_pids(service, "Ingress")) & set(ingresses)
    done = await assert_completed_with_exactly_their_assets(http, service, jobs)
    # The ingress held no job: nothing needed a re-run.
    assert [job["attempts"] for job in done] == [1] * len(done)


def logged(service: RunningService, text: str) -> bool:
    """Whether ``text`` is in the service's log or any log file of its Ray instance."""
    paths = [service.log_path, *(service.ray_tmpdir / "ray").glob("session_*/logs/**/*")]
    return any(path.is_file() and text in path.read_text(errors="replace") for path in paths)


async def test_a_replica_that_stops_renewing_its_leases_is_replaced_and_its_job_done_elsewhere(
    http: httpx.AsyncClient,
    service: RunningService,
    service_db: asyncpg.Connection,
    service_database: ServiceDatabase,
):
    """The WAN replica's heartbeat waits on a row lock the test holds (a lock wait, a
    half-open socket): its statements time out, its leases go unrenewed, its check_health
    fails, and Serve replaces it. The job then completes on the new replica."""
    job = await submit(http, job_type="video_fast")
    deadline = time.monotonic() + 120
    while (
        row := await service_db.fetchrow(
            "SELECT claimed_by FROM jobs WHERE id = $1 AND status = 'processing'", job["id"]
        )
    ) is None:
        assert time.monotonic() < deadline, "the job was never claimed"
        await asyncio.sleep(0.02)
    first_holder = row["claimed_by"]
    pid = pid_of(first_holder)
    locker = await asyncpg.connect(service_database.direct_url)
    try:
        async with locker.transaction():
            await locker.execute("SELECT id FROM jobs WHERE id = $1 FOR UPDATE", job["id"])
            deadline = time.monotonic() + 150
            while pid in replica_pids(service, "WAN"):
                assert time.monotonic() < deadline, "the unhealthy WAN replica was not replaced"
                await asyncio.sleep(0.5)
    finally:
        await locker.close()
    done = await finished(http, job["id"], timeout_s=180)
    assert done["status"] == "completed", done["error_message"]
    holder = await service_db.fetchval("SELECT claimed_by FROM jobs WHERE id = $1", job["id"])
    assert pid_of(holder) != pid and holder != first_holder, "done by the new replica"
    [asset] = done["assets"]
    assert (service.data_dir / "storage" / asset["bucket"] / asset["path"]).stat().st_size > 0
    # Serve replaced it because its own health check said why, not because it crashed.
    assert logged(service, "health check failed: the leases of 1 held jobs were last renewed")
