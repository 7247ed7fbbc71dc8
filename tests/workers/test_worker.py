"""The queue worker in-process (no Ray) over real PostgreSQL and storage, with tiny models.

Faults are real where they can be: a lease really expires and is reaped, storage really
raises, PostgreSQL is really stopped and started again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import numpy as np
import pytest
from PIL import Image

from ourvidz_serve.api.app import create_app
from ourvidz_serve.catalog import Queue
from ourvidz_serve.domain import JobStatus
from ourvidz_serve.errors import StorageError
from ourvidz_serve.jobs.planning import plan_job
from ourvidz_serve.jobs.protocol import JobRequest
from ourvidz_serve.persistence.database import start_embedded_postgres
from ourvidz_serve.persistence.repository import JobRecord, JobRepository
from ourvidz_serve.pipelines.base import EncodedAsset, ImageRequest
from ourvidz_serve.pipelines.encode import probe_mp4
from ourvidz_serve.settings import Settings
from ourvidz_serve.storage import Storage
from ourvidz_serve.storage.local import LocalStorage
from ourvidz_serve.workers.handlers import (
    Generated,
    JobHandler,
    JobResult,
    SDXLJobHandler,
    WanJobHandler,
)
from ourvidz_serve.workers.worker import QueueWorker, WorkerConfig
from tests.conftest import TEST_API_KEY
from tests.inprocess import InProcessModels, TinyRunners, running_workers

USER = UUID("6f1c1f38-5b8e-4a52-8f8e-0c9a6f0d2b11")


def plan(job_type: str = "sdxl_image_fast", **fields):
    body = {"job_type": job_type, "prompt": "a kite over dunes"} | fields
    return plan_job(JobRequest.model_validate(body), USER)


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout_s: float = 30.0, what: str = "condition"
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"{what} not reached in time"
        await asyncio.sleep(0.05)


async def terminal(repository: JobRepository, job_id: UUID, timeout_s: float = 90.0) -> JobRecord:
    async def done() -> bool:
        job = await repository.get_job(job_id)
        return job is not None and job.status in (JobStatus.COMPLETED, JobStatus.FAILED)

    await eventually(done, timeout_s, f"job {job_id} terminal")
    job = await repository.get_job(job_id)
    assert job is not None
    return job


def stop_postgres(server: Any) -> None:
    """A fast shutdown: sessions are cut, as in a crash or a failover."""
    from pgserver._commands import pg_ctl

    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)


class FlakyStorage:
    """Local storage whose first ``failures`` uploads raise, as a flaky S3 would."""

    def __init__(self, inner: LocalStorage, failures: int) -> None:
        self._inner = inner
        self.failures_left = failures
        self.failed_puts = 0

    async def put(self, bucket: str, key: str, data: bytes, content_type: str) -> None:
        if self.failures_left > 0:
            self.failures_left -= 1
            self.failed_puts += 1
            raise StorageError(f"injected upload failure for {bucket}/{key}")
        await self._inner.put(bucket, key, data, content_type)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class HeldHandler:
    """Generates nothing until released: a model replica stuck in a long generation."""

    def __init__(self, payload: bytes = b"stale output") -> None:
        self.claimed: asyncio.Queue[list[JobRecord]] = asyncio.Queue()
        self.release = asyncio.Event()
        self._payload = payload

    async def run(self, jobs: Sequence[JobRecord], control: Any = None) -> list[JobResult]:
        await self.claimed.put(list(jobs))
        await self.release.wait()
        return [
            Generated(
                outputs=[
                    EncodedAsset(self._payload, "image/png", int(a.metadata["seed"]), 32, 32)
                    for a in job.assets
                ],
                prompt=job.prompt,
                generation_time=0.01,
            )
            for job in jobs
        ]


@asynccontextmanager
async def worker(
    repository: JobRepository,
    storage: Storage,
    handler: JobHandler,
    settings: Settings,
    name: str = "test-worker",
    **config: Any,
) -> AsyncIterator[QueueWorker]:
    await storage.start()
    queue_worker = QueueWorker(
        repository,
        storage,
        handler,
        dataclasses.replace(WorkerConfig.for_queue(settings, Queue.SDXL), **config),
        name,
    )
    await queue_worker.start()
    try:
        yield queue_worker
    finally:
        await queue_worker.stop()


async def test_one_claim_runs_compatible_jobs_in_one_call_with_honest_timings(
    repository, settings, local_storage, tiny_runners: TinyRunners
):
    one, _ = await repository.insert_job(plan(num_images=1, seed=7))
    three, _ = await repository.insert_job(plan(num_images=3, seed=70))
    await asyncio.sleep(0.2)  # queue wait the record must show
    handler = SDXLJobHandler(tiny_runners.sdxl, local_storage)
    async with worker(repository, local_storage, handler, settings):
        done = [await terminal(repository, one.id), await terminal(repository, three.id)]
    for job in done:
        assert job.status is JobStatus.COMPLETED, job.error_message
        meta = job.metadata
        assert meta["attempt"] == job.attempts == 1
        assert meta["pipeline_batch_images"] == 4  # both jobs, one pipeline call
        assert job.started_at is not None
        assert meta["queue_wait_time"] == pytest.approx(
            (job.started_at - job.created_at).total_seconds(), abs=1e-3
        )
        assert meta["queue_wait_time"] >= 0.2
        assert 0 < meta["generation_time"] <= meta["total_time"]
        denoised = datetime.fromisoformat(meta["denoising_finished_at"])
        assert job.completed_at is not None
        assert job.started_at < denoised <= job.completed_at
        for asset in job.assets:
            assert local_storage.path_for(asset.bucket, asset.path).read_bytes()[:4] == b"\x89PNG"


async def test_records_show_the_size_the_model_produced_and_what_was_asked(
    repository, settings, local_storage, tiny_runners: TinyRunners
):
    image, _ = await repository.insert_job(plan(num_images=3))
    video, _ = await repository.insert_job(plan("video_fast", frame_num=9))
    handlers = {
        Queue.SDXL: SDXLJobHandler(tiny_runners.sdxl, local_storage),
        Queue.WAN: WanJobHandler(tiny_runners.wan, InProcessModels(tiny_runners.enhancer)),
    }
    for queue, job in ((Queue.SDXL, image), (Queue.WAN, video)):
        async with worker(repository, local_storage, handlers[queue], settings, queue=queue.value):
            done = await terminal(repository, job.id)
        assert done.status is JobStatus.COMPLETED, done.error_message
        # The tiny profile draws at its native size whatever the job type asks.
        assert (done.metadata["requested_width"], done.metadata["requested_height"]) == (
            job.metadata["width"],
            job.metadata["height"],
        )
        for asset in done.assets:
            data = local_storage.path_for(asset.bucket, asset.path).read_bytes()
            if queue is Queue.SDXL:
                size, frames = Image.open(io.BytesIO(data)).size, 1
            else:
                info = probe_mp4(data)
                size, frames = (info.width, info.height), info.num_frames
            meta = asset.metadata
            assert (meta["width"], meta["height"], meta["num_frames"]) == (*size, frames)
            assert (done.metadata["width"], done.metadata["height"]) == size
        assert frames == (1 if queue is Queue.SDXL else 9)


async def test_jobs_arriving_during_a_call_wait_and_share_the_next_call(
    repository, settings, local_storage
):
    await repository.insert_job(plan())
    handler = HeldHandler()
    async with worker(repository, local_storage, handler, settings):
        first = await asyncio.wait_for(handler.claimed.get(), timeout=10)
        arriving = [(await repository.insert_job(plan()))[0].id for _ in range(5)]
        await asyncio.sleep(0.5)  # several polls and notifications: no claim while busy
        assert handler.claimed.empty()
        handler.release.set()
        second = await asyncio.wait_for(handler.claimed.get(), timeout=10)
    assert len(first) == 1
    assert [job.id for job in second] == arriving


class BrokenHandler:
    async def run(self, jobs: Sequence[JobRecord], control: Any = None) -> list[JobResult]:
        raise RuntimeError("handler bug")


async def test_a_handler_that_raises_fails_its_jobs_instead_of_holding_them(
    repository, settings, local_storage
):
    job, _ = await repository.insert_job(plan(num_images=3))
    async with worker(repository, local_storage, BrokenHandler(), settings) as w:
        done = await terminal(repository, job.id)
        assert w.held_jobs() == {}
    assert done.status is JobStatus.FAILED
    assert (done.metadata["error_type"], done.error_message) == ("RuntimeError", "handler bug")


async def test_uploads_that_fail_at_first_are_retried_and_the_job_completes_with_every_file(
    repository, settings, local_storage, tiny_runners: TinyRunners
):
    flaky = FlakyStorage(local_storage, failures=3)
    job, _ = await repository.insert_job(plan(num_images=3))
    handler = SDXLJobHandler(tiny_runners.sdxl, local_storage)
    async with worker(repository, flaky, handler, settings, storage_put_attempts=5):
        done = await terminal(repository, job.id)
    assert done.status is JobStatus.COMPLETED, done.error_message
    assert flaky.failed_puts == 3
    for asset in done.assets:
        assert asset.status is JobStatus.COMPLETED
        assert local_storage.path_for(asset.bucket, asset.path).stat().st_size > 0


async def test_storage_failing_for_good_fails_the_job_and_never_completes_it(
    repository, settings, local_storage, tiny_runners: TinyRunners
):
    broken = FlakyStorage(local_storage, failures=10**6)
    job, _ = await repository.insert_job(plan(num_images=1))
    handler = SDXLJobHandler(tiny_runners.sdxl, local_storage)
    async with worker(repository, broken, handler, settings, storage_put_attempts=2):
        done = await terminal(repository, job.id)
    assert done.status is JobStatus.FAILED
    assert done.metadata["error_type"] == "StorageError"
    assert "injected upload failure" in (done.error_message or "")
    assert {asset.status for asset in done.assets} == {JobStatus.FAILED}
    assert broken.failed_puts == 2  # tried storage_put_attempts times
    assert not any(local_storage.path_for(a.bucket, a.path).exists() for a in done.assets), (
        "no file of a failed job is left behind as if completed"
    )


async def test_a_stopping_worker_finishes_what_fits_in_its_grace_period(
    repository, settings, local_storage
):
    job, _ = await repository.insert_job(plan())
    handler = HeldHandler()
    async with worker(repository, local_storage, handler, settings, shutdown_grace_s=5.0) as w:
        await asyncio.wait_for(handler.claimed.get(), timeout=10)
        stopping = asyncio.create_task(w.stop())
        await asyncio.sleep(0.3)
        handler.release.set()
        await stopping
    done = await repository.get_job(job.id)
    assert done is not None and done.status is JobStatus.COMPLETED, done


async def test_a_stopping_worker_releases_what_it_cannot_finish_giving_its_attempt_back(
    repository, settings, local_storage
):
    """A rolling update stops the replica, not the job: the release leaves ``attempts`` as it
    was before the claim, so redeploys never use up a job's attempts."""
    job, _ = await repository.insert_job(plan(num_images=3))
    handler = HeldHandler()
    async with worker(repository, local_storage, handler, settings, shutdown_grace_s=0.2) as w:
        [claimed] = await asyncio.wait_for(handler.claimed.get(), timeout=10)
        assert claimed.attempts == 1
        await w.stop()
        assert w.held_jobs() == {}
    released = await repository.get_job(job.id)
    assert released is not None and released.status is JobStatus.QUEUED
    assert (released.attempts, released.claimed_by, released.lease_expires_at) == (0, None, None)
    assert {asset.status for asset in released.assets} == {JobStatus.QUEUED}
    # Claimed again, it runs as attempt 1 and stores under the contract's keys.
    async with worker(repository, local_storage, HeldHandler(), settings) as again:
        await eventually(lambda: _true(again.held_jobs() == {job.id: 1}), 10, "claimed again")


class StuckStorage(FlakyStorage):
    """Uploads that never finish: a storage endpoint that hangs."""

    def __init__(self, inner: LocalStorage) -> None:
        super().__init__(inner, failures=0)
        self.uploading = asyncio.Event()

    async def put(self, bucket: str, key: str, data: bytes, content_type: str) -> None:
        self.uploading.set()
        await asyncio.Event().wait()


async def test_a_stopping_worker_releases_a_job_caught_mid_upload(
    repository, settings, local_storage
):
    job, _ = await repository.insert_job(plan())
    handler = HeldHandler()
    handler.release.set()
    stuck = StuckStorage(local_storage)
    async with worker(repository, stuck, handler, settings, shutdown_grace_s=0.2) as w:
        await asyncio.wait_for(stuck.uploading.wait(), timeout=10)
        await w.stop()
    released = await repository.get_job(job.id)
    assert released is not None and released.status is JobStatus.QUEUED
    assert released.lease_expires_at is None and released.claimed_by is None


async def test_a_worker_that_lost_its_lease_drops_its_result_and_the_newer_attempt_wins(
    repository, pool: asyncpg.Pool, settings, local_storage, tiny_runners: TinyRunners
):
    job, _ = await repository.insert_job(plan(num_images=3, seed=5))
    stuck = HeldHandler(payload=b"stale output")
    live = SDXLJobHandler(tiny_runners.sdxl, local_storage)
    # Busy (its one call running) and silent: it neither claims again nor renews nor reaps.
    quiet = {
        "lease_s": 60.0,
        "heartbeat_interval_s": 30.0,
        "reaper_interval_s": 60.0,
    }
    async with worker(repository, local_storage, stuck, settings, "stuck", **quiet):
        await asyncio.wait_for(stuck.claimed.get(), timeout=10)
        # The stuck replica stops renewing (a GC pause, a partition): its lease runs out.
        await pool.execute(
            "UPDATE jobs SET lease_expires_at = clock_timestamp() - interval '1 s' WHERE id = $1",
            job.id,
        )
        [reaped] = await repository.reap_expired_leases(settings.max_attempts)
        assert reaped.status is JobStatus.QUEUED
        async with worker(repository, local_storage, live, settings, "live"):
            fresh = await terminal(repository, job.id)
        assert fresh.status is JobStatus.COMPLETED and fresh.attempts == 2
        files = {
            a.path: local_storage.path_for(a.bucket, a.path).read_bytes() for a in fresh.assets
        }

        stuck.release.set()  # the stale attempt finishes late
        await asyncio.sleep(0.5)

    final = await repository.get_job(job.id)
    assert final is not None and final.status is JobStatus.COMPLETED
    assert final.metadata["attempt"] == 2 and final.attempts == 2
    for asset in final.assets:
        stored = local_storage.path_for(asset.bucket, asset.path).read_bytes()
        assert stored == files[asset.path] != b"stale output"


async def test_a_database_restart_loses_no_job_and_submissions_meanwhile_get_503(
    tiny_runners: TinyRunners, tmp_path: Path
):
    pg_dir = Path(tempfile.mkdtemp(prefix="ovzr", dir="/tmp"))
    server = start_embedded_postgres(pg_dir)
    settings = Settings(
        database_url=str(server.get_uri()),
        data_dir=tmp_path / "data",
        api_keys=[TEST_API_KEY],
        queue_poll_interval_s=0.2,
        heartbeat_interval_s=0.5,
        reaper_interval_s=0.5,
    )
    app = create_app(settings, InProcessModels(tiny_runners.enhancer))
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {TEST_API_KEY}"}
    body = {"prompt": "a lantern in fog", "user_id": str(USER)}
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=transport, base_url="http://127.0.0.1", headers=headers
            ) as http,
        ):
            jobs = [
                (await http.post("/v1/jobs", json=body | {"job_type": job_type})).json()
                for job_type in ("video_fast", "sdxl_image_fast", "image_fast", "sdxl_image_high")
            ]
            async with running_workers(settings, tiny_runners):

                async def one_running() -> bool:
                    listed = (await http.get("/v1/jobs?status=processing")).json()
                    return bool(listed["jobs"])

                await eventually(one_running, what="a job processing")
                await asyncio.to_thread(stop_postgres, server)

                refused = await http.post("/v1/jobs", json=body | {"job_type": "image_fast"})
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["code"] == "database_unavailable"
                # No DSN, host or socket path reaches the caller.
                assert str(pg_dir) not in refused.text and "postgres" not in refused.text
                unreadable = await http.get(f"/v1/jobs/{jobs[0]['id']}")
                assert unreadable.status_code == 503
                await asyncio.sleep(1.5)

                await asyncio.to_thread(server.ensure_postgres_running)
                assert str(server.get_uri()) == settings.database_url.get_secret_value()

                async def all_completed() -> bool:
                    response = await http.get("/v1/jobs?limit=10")
                    if response.status_code != 200:
                        return False
                    listed = response.json()["jobs"]
                    return len(listed) == 4 and all(j["status"] == "completed" for j in listed)

                await eventually(all_completed, timeout_s=60, what="every job completed")
            for submitted in jobs:
                done = (await http.get(f"/v1/jobs/{submitted['id']}")).json()
                assert len(done["assets"]) == len(submitted["assets"])
                assert [a["id"] for a in done["assets"]] == [a["id"] for a in submitted["assets"]]
                for asset in done["assets"]:
                    stored = settings.local_storage_dir / asset["bucket"] / asset["path"]
                    assert stored.stat().st_size > 0
    finally:
        server.cleanup()
        shutil.rmtree(pg_dir, ignore_errors=True)


class EnhancerThatWritesAForbiddenPrompt:
    async def enhance(self, requests):
        from ourvidz_serve.pipelines.base import EnhanceResult

        return [
            EnhanceResult(f"{r.prompt}, nude, a 13 year old", used_fallback=False) for r in requests
        ]


class CountingRunner:
    def __init__(self, runner) -> None:
        self._runner = runner
        self.calls = 0

    def generate(self, request):
        self.calls += 1
        return self._runner.generate(request)


async def test_an_enhanced_prompt_the_policy_refuses_fails_the_job_before_any_generation(
    repository, settings, local_storage, tiny_runners: TinyRunners
):
    from ourvidz_serve.security.prompt_policy import PromptPolicy
    from ourvidz_serve.workers.handlers import WanJobHandler

    job, _ = await repository.insert_job(plan("image7b_fast_enhanced", prompt="a portrait"))
    runner = CountingRunner(tiny_runners.wan)
    handler = WanJobHandler(runner, EnhancerThatWritesAForbiddenPrompt(), PromptPolicy())
    async with worker(
        repository, local_storage, handler, settings, queue=Queue.WAN.value, units_per_claim=1
    ):
        done = await terminal(repository, job.id)
    assert done.status is JobStatus.FAILED
    assert done.metadata["error_type"] == "PromptRefused"
    assert "content policy" in (done.error_message or "")
    assert "enhanced" in (done.error_message or "")
    assert "nude" not in (done.error_message or "")
    assert "generation_time" not in done.metadata
    assert runner.calls == 0
    assert all(asset.status is JobStatus.FAILED for asset in done.assets)


class PausingRunner:
    """A real runner whose call waits at one denoising step until the test resumes it."""

    def __init__(self, runner: Any, pause_at: int) -> None:
        self._runner = runner
        self._pause_at = pause_at
        self.reached = threading.Event()
        self.resume = threading.Event()
        self.steps: list[tuple[int, int]] = []

    def validate(self, requests: Any) -> None:
        self._runner.validate(requests)

    # The SDXL runner's LoRA cache, as it is (only what SDXLJobHandler calls: a handler picks
    # its path by the methods a runner has).
    def add_lora(self, digest: str, data: bytes) -> None:
        self._runner.add_lora(digest, data)

    def resident_loras(self) -> list[str]:
        return list(self._runner.resident_loras())

    def active_loras(self) -> list[str]:
        return list(self._runner.active_loras())

    def generate(self, request: Any, on_step: Any = None) -> Any:
        def step(done: int, total: int) -> None:
            self.steps.append((done, total))
            if done == self._pause_at and not self.reached.is_set():
                self.reached.set()
                assert self.resume.wait(30), "the test never resumed the call"
            if on_step is not None:
                on_step(done, total)

        return self._runner.generate(request, step)


async def paused(runner: PausingRunner) -> None:
    assert await asyncio.to_thread(runner.reached.wait, 60), "the call never reached the step"


async def test_cancelling_a_running_video_stops_it_at_the_next_step_and_the_worker_goes_on(
    repository, settings, local_storage, tiny_runners: TinyRunners
):
    job, _ = await repository.insert_job(plan("video_fast", prompt="a train at night"))
    runner = PausingRunner(tiny_runners.wan, pause_at=3)
    handler = WanJobHandler(runner, InProcessModels(tiny_runners.enhancer))
    wan = {"queue": Queue.WAN.value, "units_per_claim": 1}
    async with worker(repository, local_storage, handler, settings, **wan) as w:
        await paused(runner)
        await asyncio.sleep(0.6)  # a progress flush records the step it reached
        running = await repository.get_job(job.id)
        assert running is not None and running.progress is not None
        # The pause holds step 3 back from the worker: step 2 is the latest it heard of.
        assert running.progress["step"] == 2 and running.progress["total"] == 25
        assert await repository.cancel_job(job.id) is JobStatus.PROCESSING
        # The heartbeat (5 s) has not run: only the NOTIFY can have told the worker.
        await eventually(lambda: _true((job.id, 1) in w._cancelled), 5, "the worker told")
        runner.resume.set()
        await eventually(lambda: _true(not w.held_jobs()), 30, "the call stopped")
        assert max(done for done, _ in runner.steps) == 3, "stopped at the next step boundary"
        cancelled = await repository.get_job(job.id)
        assert cancelled is not None and cancelled.status is JobStatus.CANCELLED
        assert [a.status for a in cancelled.assets] == [JobStatus.CANCELLED]
        assert not local_storage.path_for(
            cancelled.assets[0].bucket, cancelled.assets[0].path
        ).exists()
        # Where the call stopped is kept (the worker records it once the call has ended).
        await eventually(lambda: _has_stop(repository, job.id), 10, "the stop recorded on the job")
        stopped = await repository.get_job(job.id)
        assert stopped is not None
        assert (stopped.metadata["stopped_at_step"], stopped.metadata["total_steps"]) == (3, 25)
        # The replica is free again: the next job runs to the end.
        following, _ = await repository.insert_job(plan("image_fast", prompt="a quiet harbour"))
        done = await terminal(repository, following.id)
    assert done.status is JobStatus.COMPLETED, done.error_message


async def _true(value: bool) -> bool:
    return value


async def _has_stop(repository: JobRepository, job_id: UUID) -> bool:
    job = await repository.get_job(job_id)
    return job is not None and "stopped_at_step" in job.metadata


async def test_cancelling_one_job_of_a_shared_sdxl_call_keeps_its_batch_mate_exact(
    repository, settings, local_storage, tiny_runners: TinyRunners
):
    kept, _ = await repository.insert_job(plan(num_images=1, seed=7))
    dropped, _ = await repository.insert_job(plan(num_images=1, seed=9))
    runner = PausingRunner(tiny_runners.sdxl, pause_at=2)
    handler = SDXLJobHandler(runner, local_storage)
    async with worker(repository, local_storage, handler, settings) as w:
        await paused(runner)
        assert set(w.held_jobs()) == {kept.id, dropped.id}, "both jobs share the call"
        assert await repository.cancel_job(dropped.id) is JobStatus.PROCESSING
        gone = await repository.get_job(dropped.id)
        assert gone is not None and gone.status is JobStatus.CANCELLED  # at once
        await eventually(lambda: _true((dropped.id, 1) in w._cancelled), 5, "the worker told")
        runner.resume.set()
        done = await terminal(repository, kept.id)
    steps = [done_steps for done_steps, _ in runner.steps]
    assert max(steps) == runner.steps[0][1], "the call ran on for the job still wanted"
    assert done.status is JobStatus.COMPLETED
    after = await repository.get_job(dropped.id)
    assert after is not None and after.status is JobStatus.CANCELLED
    assert [a.status for a in after.assets] == [JobStatus.CANCELLED]
    assert not local_storage.path_for(after.assets[0].bucket, after.assets[0].path).exists()
    stored = local_storage.path_for(done.assets[0].bucket, done.assets[0].path).read_bytes()
    [alone] = tiny_runners.sdxl.generate(
        [
            ImageRequest(
                prompt=done.prompt,
                negative_prompt=done.metadata["negative_prompt"],
                seed=7,
                steps=int(done.metadata["steps"]),
                guidance_scale=float(done.metadata["guidance_scale"]),
                width=int(done.metadata["requested_width"]),
                height=int(done.metadata["requested_height"]),
            )
        ]
    )
    difference = np.abs(png_pixels(stored) - png_pixels(alone.data)).max()
    assert int(difference) <= 2


async def test_an_sdxl_call_whose_every_job_is_cancelled_stops_at_the_next_step(
    repository, settings, local_storage, tiny_runners: TinyRunners
):
    job, _ = await repository.insert_job(plan(num_images=3))
    runner = PausingRunner(tiny_runners.sdxl, pause_at=2)
    async with worker(
        repository, local_storage, SDXLJobHandler(runner, local_storage), settings
    ) as w:
        await paused(runner)
        await repository.cancel_job(job.id)
        await eventually(lambda: _true((job.id, 1) in w._cancelled), 5, "the worker told")
        runner.resume.set()
        await eventually(lambda: _true(not w.held_jobs()), 30, "the call stopped")
    assert max(done for done, _ in runner.steps) == 2
    cancelled = await repository.get_job(job.id)
    assert cancelled is not None and cancelled.status is JobStatus.CANCELLED
    assert [a.status for a in cancelled.assets] == [JobStatus.CANCELLED] * 3


def png_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)
