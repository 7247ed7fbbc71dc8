"""The queue worker inside each model replica: claim, hold leases, run, store, record.

A worker claims from its queue only what it can start now (its free capacity in units), so a
claimed job is a running job: ``queue_wait_time`` ends at the claim and ``generation_time`` is
model time. Every claim holds a lease that a heartbeat renews; every outcome is recorded
fenced by the attempt number, so a replica that lost its lease cannot overwrite a newer
attempt. A stopping replica finishes what fits in its grace period and releases the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)
from tenacity.stop import StopBaseT

from ourvidz_serve.catalog import Queue
from ourvidz_serve.errors import DatabaseUnavailable, OurVidzError, StorageError
from ourvidz_serve.observability.metrics import NO_METRICS, Metrics
from ourvidz_serve.persistence.repository import (
    AssetCompletion,
    AssetRecord,
    JobRecord,
    JobRepository,
)
from ourvidz_serve.pipelines.base import EncodedAsset
from ourvidz_serve.settings import Settings
from ourvidz_serve.storage import Storage
from ourvidz_serve.workers.handlers import (
    Generated,
    JobCancelled,
    JobHandler,
    JobResult,
    RunControl,
)
from ourvidz_serve.workers.reaper import run_reaper

logger = logging.getLogger(__name__)

BACKLOG_REFRESH_S = 1.0
PROGRESS_INTERVAL_S = 0.25


@dataclass(frozen=True)
class WorkerConfig:
    queue: str
    max_calls: int
    """Pipeline calls this worker runs at once; it claims only while one is free."""
    units_per_claim: int
    """Most units (SDXL images, WAN jobs) one claim takes: one claim is one pipeline call."""
    lease_s: float
    heartbeat_interval_s: float
    poll_interval_s: float
    reaper_interval_s: float
    max_attempts: int
    shutdown_grace_s: float
    storage_put_attempts: int
    record_retry_s: float

    @classmethod
    def for_queue(cls, settings: Settings, queue: Queue) -> WorkerConfig:
        # One SDXL call at a time: while it runs, new jobs gather in the queue, and the next
        # claim takes them together (a full call of 6 images runs ~2x faster per image).
        if queue is Queue.SDXL:
            calls, per_claim = 1, settings.sdxl_batch_images
        else:
            calls, per_claim = settings.wan_concurrency, 1
        return cls(
            queue=queue.value,
            max_calls=calls,
            units_per_claim=per_claim,
            lease_s=settings.lease_s,
            heartbeat_interval_s=settings.heartbeat_interval_s,
            poll_interval_s=settings.queue_poll_interval_s,
            reaper_interval_s=settings.reaper_interval_s,
            max_attempts=settings.max_attempts,
            shutdown_grace_s=settings.worker_shutdown_grace_s,
            storage_put_attempts=settings.storage_put_attempts,
            record_retry_s=settings.record_retry_s,
        )


class QueueWorker:
    def __init__(
        self,
        repository: JobRepository,
        storage: Storage,
        handler: JobHandler,
        config: WorkerConfig,
        worker_id: str,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self._repository = repository
        self._metrics = metrics
        self._storage = storage
        self._handler = handler
        self._config = config
        self.worker_id = worker_id
        self._wake = asyncio.Event()
        self._calls = 0
        """Pipeline calls running now (claimed batches not yet generated)."""
        self._busy_units = 0
        self._held: dict[UUID, int] = {}
        """Jobs this worker holds a lease on: ``{job_id: attempt}``."""
        self._batches: set[asyncio.Task[None]] = set()
        self._claiming: list[asyncio.Task[None]] = []
        self._keeping: list[asyncio.Task[None]] = []
        self._backlog = 0
        self._cancelled: set[UUID] = set()
        """Held jobs cancelled (or lost) while running; read from pipeline threads."""
        self._progress: dict[tuple[UUID, int], tuple[int, int]] = {}
        """Progress not yet recorded: ``{(job, attempt): (step, total)}``, latest only."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._denoised_at: dict[UUID, float] = {}
        self._progress_flushing = asyncio.Lock()
        self._control = RunControl(
            is_cancelled=self._cancelled.__contains__, report_progress=self._report_progress
        )

    async def start(self) -> None:
        self._claiming = [
            asyncio.create_task(self._claim_loop(), name=f"claim-{self._config.queue}"),
            asyncio.create_task(
                self._repository.listen(self._on_queued, self._on_cancelled), name="listen"
            ),
            asyncio.create_task(self._backlog_loop(), name="backlog"),
        ]
        self._loop = asyncio.get_running_loop()
        self._keeping = [
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._progress_loop(), name="progress"),
            asyncio.create_task(
                run_reaper(
                    self._repository, self._config.reaper_interval_s, self._config.max_attempts
                ),
                name="reaper",
            ),
        ]

    async def stop(self) -> None:
        """Stop claiming, let running jobs finish within the grace period, release the rest."""
        await _cancel(self._claiming)
        if self._batches:
            _, pending = await asyncio.wait(
                set(self._batches), timeout=self._config.shutdown_grace_s
            )
            await _cancel(list(pending))
        for job_id, attempt in list(self._held.items()):
            try:
                if await self._repository.release_job(job_id, attempt):
                    logger.info("released job %s (attempt %d) to the queue", job_id, attempt)
            except DatabaseUnavailable:
                logger.warning("could not release job %s; its lease will expire", job_id)
        self._held.clear()
        await _cancel(self._keeping)

    def held_jobs(self) -> dict[UUID, int]:
        return dict(self._held)

    def load(self) -> tuple[int, int]:
        """``(units queued in the queue, as last read; units this worker is running)``."""
        return self._backlog, self._busy_units

    def _on_queued(self, queue: str) -> None:
        if queue == self._config.queue:
            self._wake.set()

    def _on_cancelled(self, job_id: UUID) -> None:
        """A job was cancelled: if it runs here, its call stops at the next step boundary."""
        if job_id in self._held:
            logger.info("job %s was cancelled; stopping it at the next step", job_id)
            self._cancelled.add(job_id)

    def _report_progress(self, job_id: UUID, step: int, total: int) -> None:
        """From the pipeline's thread: keep the latest step, for the next progress flush."""
        attempt = self._held.get(job_id)
        if attempt is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(
                self._keep_progress, job_id, attempt, step, total, time.time()
            )

    def _keep_progress(self, job_id: UUID, attempt: int, step: int, total: int, at: float) -> None:
        self._progress[(job_id, attempt)] = (step, total)
        if step == total:
            # When denoising ended: what decoding, encoding, storing and recording add after
            # it is the delivery latency users see.
            self._denoised_at[job_id] = at

    async def _progress_loop(self) -> None:
        """Record the latest progress of running jobs, at most every PROGRESS_INTERVAL_S:
        a 6-image call at 30 steps/s costs the database a few statements a second."""
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            await self._flush_progress()

    async def _flush_progress(self) -> None:
        """Record the progress kept so far. Serialized, so a flush that returns has every
        earlier step recorded (and its event sent) before anything the caller does next."""
        async with self._progress_flushing:
            pending, self._progress = self._progress, {}
            try:
                await self._repository.record_progress(pending)
            except DatabaseUnavailable as exc:
                logger.warning("cannot record progress: %s", exc.message)

    async def _claim_loop(self) -> None:
        config = self._config
        while True:
            self._wake.clear()
            if self._calls < config.max_calls:
                jobs: list[JobRecord] = []
                try:
                    jobs = await self._repository.claim_jobs(
                        config.queue, config.units_per_claim, self.worker_id, config.lease_s
                    )
                except DatabaseUnavailable as exc:
                    logger.warning("cannot claim from %s: %s", config.queue, exc.message)
                except Exception:
                    # The loop must outlive a bad row or a bug, or the replica idles for ever.
                    logger.exception("claiming from %s failed; retrying", config.queue)
                if jobs:
                    self._start_batch(jobs)
                    continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=config.poll_interval_s)

    def _start_batch(self, jobs: list[JobRecord]) -> None:
        units = sum(job.units for job in jobs)
        self._calls += 1
        self._busy_units += units
        for job in jobs:
            self._held[job.id] = job.attempts
        task = asyncio.create_task(self._run_batch(jobs, units), name=f"batch-{jobs[0].id}")
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _run_batch(self, jobs: list[JobRecord], units: int) -> None:
        claimed_at = time.monotonic()
        for job in jobs:
            wait = _queue_wait_s(job)
            if wait is not None:
                self._metrics.job_started(job.job_type, wait)
        try:
            results: list[JobResult] = await self._handler.run(jobs, self._control)
        except Exception as exc:
            # Handlers return each job's error; one that raises anyway fails its jobs rather
            # than leaving them held (and their leases renewed) by nobody.
            logger.exception("the %s handler raised", self._config.queue)
            results = [exc] * len(jobs)
        finally:
            # Capacity frees when the model is done, so the next batch generates while this
            # one uploads.
            self._calls -= 1
            self._busy_units -= units
            self._wake.set()
        # The call's last steps are recorded before its files: no progress event follows an
        # asset event of the same job.
        await self._flush_progress()
        await asyncio.gather(
            *(
                self._finish(job, result, claimed_at)
                for job, result in zip(jobs, results, strict=True)
            )
        )

    async def _finish(self, job: JobRecord, result: JobResult, claimed_at: float) -> None:
        try:
            if isinstance(result, Generated) and len(result.outputs) != len(job.assets):
                result = RuntimeError(
                    f"model returned {len(result.outputs)} outputs for {len(job.assets)} assets"
                )
            if isinstance(result, JobCancelled):
                # The job's rows ended 'cancelled' when it was cancelled; only where its call
                # stopped is left to record.
                logger.info("job %s attempt %d stopped: %s", job.id, job.attempts, result)
                if result.step is not None:
                    stop = {"stopped_at_step": result.step, "total_steps": result.total}
                    await self._record(
                        lambda: self._repository.record_cancelled_stop(job.id, job.attempts, stop)
                    )
            elif isinstance(result, Exception):
                await self._record_failure(job, result, claimed_at, {})
            elif await self._still_held(job):
                await self._store_and_complete(job, result, claimed_at)
        except Exception:
            logger.exception(
                "the outcome of job %s attempt %d is not recorded; its lease will expire and "
                "the reaper will queue it again",
                job.id,
                job.attempts,
            )
        # Not reached when cancelled: a stopping worker releases the jobs it still holds.
        if self._held.get(job.id) == job.attempts:
            del self._held[job.id]
        self._cancelled.discard(job.id)
        self._denoised_at.pop(job.id, None)

    async def _still_held(self, job: JobRecord) -> bool:
        """False when the lease was lost (and the job maybe re-claimed): skip the upload."""
        try:
            held = job.id in await self._repository.heartbeat(
                {job.id: job.attempts}, self._config.lease_s
            )
        except DatabaseUnavailable:
            return True  # Unknown: keys are deterministic, and recording is fenced anyway.
        if not held:
            logger.warning(
                "job %s attempt %d lost its lease before storing; dropping its outputs",
                job.id,
                job.attempts,
            )
        return held

    async def _store_and_complete(
        self, job: JobRecord, generated: Generated, claimed_at: float
    ) -> None:
        failure: StorageError | None = None
        try:
            # A file that cannot be stored cancels the other uploads: the job fails whole.
            async with asyncio.TaskGroup() as uploads:
                for asset, output in zip(job.assets, generated.outputs, strict=True):
                    uploads.create_task(self._store_asset(job, asset, output))
        except* StorageError as errors:
            error = errors.exceptions[0]
            failure = error if isinstance(error, StorageError) else StorageError(str(error))
        if failure is not None:
            await self._record_failure(job, failure, claimed_at, generated.metadata)
            return
        generation_time = round(generated.generation_time, 4)
        completions = [
            AssetCompletion(
                index=asset.index,
                path=asset.path,
                metadata={
                    "seed": output.seed,
                    "width": output.width,
                    "height": output.height,
                    "num_frames": output.num_frames,
                    "mime_type": output.mime_type,
                    "size_bytes": len(output.data),
                    "generation_time": generation_time,
                    "stored_path": asset.path,
                    "prompt": generated.prompt,
                },
            )
            for asset, output in zip(job.assets, generated.outputs, strict=True)
        ]
        first = generated.outputs[0]
        metadata = _timings(job, claimed_at) | generated.metadata
        if job.id in self._denoised_at:
            denoised = datetime.fromtimestamp(self._denoised_at[job.id], UTC)
            metadata["denoising_finished_at"] = denoised.isoformat()
        metadata |= {
            "generation_time": generation_time,
            "generation_timestamp": datetime.now(UTC).isoformat(),
            "output_width": first.width,
            "output_height": first.height,
            "batch_count": len(generated.outputs),
        }
        metadata |= _produced_size(job.metadata, first)
        expected = float(job.metadata.get("expected_generation_time") or 0)
        if expected > 0:
            metadata["performance_ratio"] = round(generated.generation_time / expected, 6)
        recorded = await self._record(
            lambda: self._repository.complete_job(job.id, job.attempts, metadata, completions)
        )
        self._log_fenced(job, recorded, "completion")
        if recorded:
            self._metrics.job_finished(
                job.job_type, "completed", generated.generation_time, expected or None
            )

    async def _record_failure(
        self, job: JobRecord, error: Exception, claimed_at: float, metadata: dict[str, Any]
    ) -> None:
        logger.error("job %s (%s) failed: %r", job.id, job.job_type, error)
        message = (error.message if isinstance(error, OurVidzError) else str(error)) or type(
            error
        ).__name__
        patch = _timings(job, claimed_at) | metadata
        recorded = await self._record(
            lambda: self._repository.fail_job(
                job.id, job.attempts, message, type(error).__name__, patch
            )
        )
        self._log_fenced(job, recorded, "failure")
        if recorded:
            self._metrics.job_finished(job.job_type, "failed")

    @staticmethod
    def _log_fenced(job: JobRecord, recorded: bool, what: str) -> None:
        if not recorded:
            logger.warning(
                "the %s of job %s attempt %d was fenced out: a newer attempt owns the job",
                what,
                job.id,
                job.attempts,
            )

    async def _store_asset(self, job: JobRecord, asset: AssetRecord, output: EncodedAsset) -> None:
        """Store one file, then tell SSE subscribers (a lost event is not worth a failure)."""
        thumbnail = asset.metadata.get("thumbnail_path")
        if output.poster is not None and thumbnail:
            await self._put(asset.bucket, thumbnail, output.poster, "image/webp")
        await self._put(asset.bucket, asset.path, output.data, output.mime_type)
        try:
            await self._repository.publish_asset_stored(
                job.id, job.attempts, asset.index, asset.bucket, asset.path
            )
        except DatabaseUnavailable as exc:
            logger.warning("asset event of job %s not sent: %s", job.id, exc.message)

    async def _put(self, bucket: str, key: str, data: bytes, content_type: str) -> None:
        async for attempt in _retrying(
            StorageError,
            stop_after_attempt(self._config.storage_put_attempts),
            f"upload of {bucket}/{key}",
        ):
            with attempt:
                await self._storage.put(bucket, key, data, content_type)

    async def _record(self, write: Callable[[], Awaitable[bool]]) -> bool:
        """Write an outcome, retrying while the database is unavailable: keep the result."""
        async for attempt in _retrying(
            DatabaseUnavailable,
            stop_after_delay(self._config.record_retry_s),
            "recording an outcome",
        ):
            with attempt:
                return await write()
        raise AssertionError("unreachable: AsyncRetrying reraises")

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.heartbeat_interval_s)
            held = dict(self._held)
            if not held:
                continue
            try:
                kept = await self._repository.heartbeat(held, self._config.lease_s)
            except DatabaseUnavailable as exc:
                logger.warning("cannot renew %d leases: %s", len(held), exc.message)
                continue
            for job_id in held.keys() - kept:
                # A job that finished while the heartbeat ran is no longer held: not a loss.
                if self._held.get(job_id) == held[job_id]:
                    # Cancelled, or reaped and maybe claimed again: either way its outcome
                    # is fenced out, so stop spending model time on it (a missed NOTIFY too).
                    logger.warning(
                        "job %s attempt %d is no longer held (cancelled or lease lost)",
                        job_id,
                        held[job_id],
                    )
                    self._cancelled.add(job_id)

    async def _backlog_loop(self) -> None:
        while True:
            try:
                self._backlog = await self._repository.queued_units(self._config.queue)
            except DatabaseUnavailable as exc:
                logger.warning("cannot read the backlog: %s", exc.message)
            await asyncio.sleep(BACKLOG_REFRESH_S)


def _retrying(error: type[Exception], stop: StopBaseT, what: str) -> AsyncRetrying:
    """Retry ``error`` with jittered exponential backoff until ``stop``, then re-raise it."""

    def log(state: RetryCallState) -> None:
        failure = state.outcome.exception() if state.outcome else None
        logger.warning("%s failed (attempt %d: %s); retrying", what, state.attempt_number, failure)

    return AsyncRetrying(
        retry=retry_if_exception_type(error),
        stop=stop,
        wait=wait_exponential_jitter(initial=0.2, max=5.0),
        before_sleep=log,
        reraise=True,
    )


def _produced_size(asked: dict[str, Any], output: EncodedAsset) -> dict[str, Any]:
    """The size the model produced as the job's ``width`` / ``height``; what was asked, when
    it differs (the tiny profile's native size), as ``requested_width`` / ``requested_height``.
    """
    produced: dict[str, Any] = {"width": output.width, "height": output.height}
    for name in ("width", "height"):
        if name in asked and asked[name] != produced[name]:
            produced[f"requested_{name}"] = asked[name]
    return produced


def _timings(job: JobRecord, claimed_at: float) -> dict[str, Any]:
    timings: dict[str, Any] = {
        "attempt": job.attempts,
        "total_time": round(time.monotonic() - claimed_at, 4),
    }
    wait = _queue_wait_s(job)
    if wait is not None:
        timings["queue_wait_time"] = round(wait, 4)
    return timings


def _queue_wait_s(job: JobRecord) -> float | None:
    """Submission to this claim (None: not claimed)."""
    if job.started_at is None:
        return None
    return (job.started_at - job.created_at).total_seconds()


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
