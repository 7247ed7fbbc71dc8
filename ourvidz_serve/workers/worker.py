"""The queue worker inside each model replica: claim, hold leases, run, store, record.

A worker claims from its queue only what it can start now (its free capacity in units), so a
claimed job is a running job: ``queue_wait_time`` ends at the claim and ``generation_time`` is
model time. Every claim holds a lease that a heartbeat renews; every outcome is recorded
fenced by the attempt number, so a replica that lost its lease cannot overwrite a newer
attempt. The fence reaches storage: an attempt stores its files under keys of its own
(``attempt_key``), the fenced completion records which keys won, and an attempt whose
completion is fenced out deletes what it stored. A stopping replica finishes what fits in its
grace period and releases the rest, giving their attempts back.

Every background loop runs under a :class:`Supervisor`: an error of any kind is logged and the
loop runs again; the replica's health check reports its problems and
:meth:`QueueWorker.lease_problems`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
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
from ourvidz_serve.domain import JobStatus
from ourvidz_serve.errors import DatabaseUnavailable, OurVidzError, StorageError
from ourvidz_serve.observability.metrics import NO_METRICS, Metrics
from ourvidz_serve.persistence.repository import (
    AdapterAffinity,
    AssetCompletion,
    AssetRecord,
    JobRecord,
    JobRepository,
)
from ourvidz_serve.pipelines.base import EncodedAsset
from ourvidz_serve.settings import Settings
from ourvidz_serve.storage import Storage, attempt_key
from ourvidz_serve.workers.handlers import (
    AdapterHolder,
    Generated,
    JobCancelled,
    JobHandler,
    JobResult,
    RunControl,
)
from ourvidz_serve.workers.reaper import reap_once
from ourvidz_serve.workers.supervision import Beat, Supervisor

logger = logging.getLogger(__name__)

BACKLOG_REFRESH_S = 1.0
Recorded = TypeVar("Recorded")
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
    loop_restart_max_s: float = 5.0
    loop_stall_s: float = 60.0
    gpu_share: float = 1.0
    """The replica's share of a GPU: what one second of its pipeline calls costs in GPU
    seconds (quotas charge measured time times it)."""
    affinity_max_wait_s: float = 0.0
    """Longest a job waits because claims prefer jobs whose LoRAs this replica holds (0: no
    preference, plain fair order)."""
    affinity_window: int = 16
    """Jobs at the head of fair order that preference looks at."""

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
            loop_restart_max_s=settings.loop_restart_max_s,
            loop_stall_s=settings.loop_stall_s,
            # Only SDXL jobs apply LoRAs.
            affinity_max_wait_s=settings.lora_affinity_max_wait_s if queue is Queue.SDXL else 0,
            affinity_window=settings.lora_affinity_window,
        )

    @property
    def lease_renewal_limit_s(self) -> float:
        """Held leases not renewed for this long make the replica unhealthy: half a lease
        (settings keep a heartbeat under half a lease)."""
        return self.lease_s / 2


class QueueWorker:
    def __init__(
        self,
        repository: JobRepository,
        storage: Storage,
        handler: JobHandler,
        config: WorkerConfig,
        worker_id: str,
        metrics: Metrics = NO_METRICS,
        supervisor: Supervisor | None = None,
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
        self._supervisor = supervisor or Supervisor(
            restart_max_s=config.loop_restart_max_s, stall_s=config.loop_stall_s
        )
        self._backlog = 0
        self._cancelled: set[tuple[UUID, int]] = set()
        """Held ``(job, attempt)`` cancelled (or lost) while running; read from pipeline
        threads. Per attempt: a job reaped and claimed again here is not taken for cancelled."""
        self._renewed_at = time.monotonic()
        """When the held leases were last all renewed (or the first of them claimed)."""
        self._progress: dict[tuple[UUID, int], tuple[int, int]] = {}
        """Progress not yet recorded: ``{(job, attempt): (step, total)}``, latest only."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._denoised_at: dict[UUID, float] = {}
        self._progress_flushing = asyncio.Lock()
        self._control = RunControl(
            is_cancelled=lambda job_id, attempt: (job_id, attempt) in self._cancelled,
            report_progress=self._report_progress,
        )

    CLAIMING_LOOPS = ("claim", "listen", "backlog")
    KEEPING_LOOPS = ("heartbeat", "progress", "reaper")

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        config, supervisor = self._config, self._supervisor
        supervisor.run("claim", self._claim_loop)
        supervisor.run("listen", self._listen)
        supervisor.every("backlog", BACKLOG_REFRESH_S, self._refresh_backlog)
        supervisor.every("heartbeat", config.heartbeat_interval_s, self._renew_leases)
        supervisor.every("progress", PROGRESS_INTERVAL_S, self._flush_progress)
        supervisor.every("reaper", config.reaper_interval_s, self._reap)

    async def stop(self, give_back: bool = True) -> None:
        """Stop claiming, let running jobs finish within the grace period, release the rest:
        their attempts given back (a rolling update is not the job's failure), unless
        ``give_back`` is False (the replica failed its health check: a job that makes its
        replica unhealthy must not run for ever)."""
        await self._supervisor.stop(list(self.CLAIMING_LOOPS))
        if self._batches:
            _, pending = await asyncio.wait(
                set(self._batches), timeout=self._config.shutdown_grace_s
            )
        else:
            pending = set()
        # What is still held now runs in the calls about to be cancelled: released below.
        held = dict(self._held)
        await _cancel(list(pending))
        self._held.clear()
        async with self._progress_flushing:
            self._progress.clear()  # the released attempts' steps: never recorded now
        for job_id, attempt in held.items():
            try:
                if await self._repository.release_job(job_id, attempt, self.worker_id, give_back):
                    logger.info("released job %s (attempt %d) to the queue", job_id, attempt)
            except DatabaseUnavailable:
                logger.warning("could not release job %s; its lease will expire", job_id)
        await self._supervisor.stop(list(self.KEEPING_LOOPS))

    def held_jobs(self) -> dict[UUID, int]:
        return dict(self._held)

    def loops(self) -> dict[str, dict[str, Any]]:
        """Each background loop's last success, failures and last error."""
        return self._supervisor.report()

    def lease_problems(self) -> list[str]:
        """Held leases not renewed for half a lease (empty: renewed): they are about to be
        lost while the model keeps computing, so the replica cannot be trusted with jobs."""
        stale = time.monotonic() - self._renewed_at
        if self._held and stale > self._config.lease_renewal_limit_s:
            return [
                f"the leases of {len(self._held)} held jobs were last renewed {stale:.0f}s ago "
                f"(lease {self._config.lease_s:.0f}s)"
            ]
        return []

    def load(self) -> tuple[int, int]:
        """``(units queued in the queue, as last read; units this worker is running)``."""
        return self._backlog, self._busy_units

    def _on_queued(self, queue: str) -> None:
        if queue == self._config.queue:
            self._wake.set()

    def _on_cancelled(self, job_id: UUID) -> None:
        """A job was cancelled: if it runs here, its call stops at the next step boundary."""
        attempt = self._held.get(job_id)
        if attempt is not None:
            logger.info("job %s was cancelled; stopping it at the next step", job_id)
            self._cancelled.add((job_id, attempt))

    async def _listen(self, beat: Beat) -> None:
        # A success each time LISTEN is established; the repository waits out lost ones.
        await self._repository.listen(self._on_queued, self._on_cancelled, on_listening=beat)

    def _report_progress(self, job_id: UUID, attempt: int, step: int, total: int) -> None:
        """From the pipeline's thread: keep the latest step, for the next progress flush."""
        if self._held.get(job_id) == attempt and self._loop is not None:
            self._loop.call_soon_threadsafe(
                self._keep_progress, job_id, attempt, step, total, time.time()
            )

    def _keep_progress(self, job_id: UUID, attempt: int, step: int, total: int, at: float) -> None:
        if self._held.get(job_id) != attempt:
            return  # finished or released since the pipeline's thread reported it
        self._progress[(job_id, attempt)] = (step, total)
        if step == total:
            # When denoising ended: what decoding, encoding, storing and recording add after
            # it is the delivery latency users see.
            self._denoised_at[job_id] = at

    async def _flush_progress(self) -> None:
        """Record the progress kept so far (the progress loop does, at most every
        PROGRESS_INTERVAL_S: a 6-image call at 30 steps/s costs a few statements a second).
        Serialized, so a flush that returns has every earlier step recorded (and its event
        sent) before anything the caller does next. Steps that could not be recorded are
        dropped: a later step replaces them."""
        async with self._progress_flushing:
            pending, self._progress = self._progress, {}
            await self._repository.record_progress(pending)

    async def _claim_loop(self, beat: Beat) -> None:
        """Claim while a call is free; otherwise wait for a NOTIFY or the poll interval."""
        config = self._config
        while True:
            self._wake.clear()
            if self._calls < config.max_calls:
                jobs = await self._repository.claim_jobs(
                    config.queue,
                    config.units_per_claim,
                    self.worker_id,
                    config.lease_s,
                    self._affinity(),
                )
                beat()
                if jobs:
                    self._start_batch(jobs)
                    continue
            else:
                beat()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=config.poll_interval_s)

    def _affinity(self) -> AdapterAffinity | None:
        """What this claim may prefer: jobs whose LoRAs the handler's runner holds."""
        if self._config.affinity_max_wait_s <= 0 or not isinstance(self._handler, AdapterHolder):
            return None
        held = self._handler.held_adapters()
        return AdapterAffinity(
            active=held.active,
            cached=held.cached,
            max_wait_s=self._config.affinity_max_wait_s,
            window=self._config.affinity_window,
        )

    def _start_batch(self, jobs: list[JobRecord]) -> None:
        units = sum(job.units for job in jobs)
        self._calls += 1
        self._busy_units += units
        if not self._held:
            self._renewed_at = time.monotonic()  # the claim itself set these leases
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
        try:
            # The call's last steps are recorded before its files: no progress event follows
            # an asset event of the same job.
            try:
                await self._flush_progress()
            except DatabaseUnavailable as exc:
                logger.warning(
                    "the last progress of a %s call is lost: %s", self._config.queue, exc
                )
            if len(results) != len(jobs):
                error = RuntimeError(f"the handler returned {len(results)} results for {len(jobs)}")
                results = [error] * len(jobs)
            await asyncio.gather(
                *(
                    self._finish(job, result, claimed_at, units)
                    for job, result in zip(jobs, results, strict=True)
                )
            )
        finally:
            # A job is never held without a running call: whatever went wrong above, its
            # lease is let go (and expires: the reaper queues it again).
            for job in jobs:
                self._forget(job)

    def _forget(self, job: JobRecord) -> None:
        if self._held.get(job.id) == job.attempts:
            del self._held[job.id]
        self._cancelled.discard((job.id, job.attempts))
        self._denoised_at.pop(job.id, None)

    def _gpu_seconds(self, job: JobRecord, seconds: float, call_units: int) -> float:
        """What ``seconds`` of a pipeline call cost the job: its share of the call's units
        times the replica's share of the GPU."""
        return round(seconds * self._config.gpu_share * job.units / max(call_units, 1), 4)

    async def _finish(
        self, job: JobRecord, result: JobResult, claimed_at: float, call_units: int
    ) -> None:
        ran = self._gpu_seconds(job, time.monotonic() - claimed_at, call_units)
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
                    # Charged for the steps that ran: a job cancelled before its call, none.
                    stop = {"stopped_at_step": result.step, "total_steps": result.total}
                    if await self._record(
                        lambda: self._repository.record_cancelled_stop(
                            job.id, job.attempts, stop, ran
                        )
                    ):
                        self._metrics.gpu_seconds_charged(job.queue, job.tier.value, ran)
            elif isinstance(result, Exception):
                await self._record_failure(job, result, claimed_at, {}, ran)
            elif await self._still_held(job):
                batch = int(result.metadata.get("pipeline_batch_images") or job.units)
                charge = self._gpu_seconds(job, result.generation_time, batch)
                await self._store_and_complete(job, result, claimed_at, charge)
        except Exception:
            logger.exception(
                "the outcome of job %s attempt %d is not recorded; its lease will expire and "
                "the reaper will queue it again",
                job.id,
                job.attempts,
            )
        # Not reached when cancelled: a stopping worker releases the jobs it still holds.
        self._forget(job)

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
        self, job: JobRecord, generated: Generated, claimed_at: float, gpu_seconds: float
    ) -> None:
        stored: list[tuple[str, str]] = []
        """``(bucket, key)`` of every file this attempt put, to delete if it does not win."""
        failure: StorageError | None = None
        try:
            # A file that cannot be stored cancels the other uploads: the job fails whole.
            async with asyncio.TaskGroup() as uploads:
                for asset, output in zip(job.assets, generated.outputs, strict=True):
                    uploads.create_task(self._store_asset(job, asset, output, stored))
        except* StorageError as errors:
            error = errors.exceptions[0]
            failure = error if isinstance(error, StorageError) else StorageError(str(error))
        if failure is not None:
            await self._delete_stored(job, stored, "its job failed to store a file")
            await self._record_failure(job, failure, claimed_at, generated.metadata, gpu_seconds)
            return
        generation_time = round(generated.generation_time, 4)
        completions = [
            AssetCompletion(
                index=asset.index,
                path=attempt_key(asset.path, job.attempts),
                metadata=_thumbnail(asset, job.attempts)
                | {
                    "seed": output.seed,
                    "width": output.width,
                    "height": output.height,
                    "num_frames": output.num_frames,
                    "mime_type": output.mime_type,
                    "size_bytes": len(output.data),
                    "generation_time": generation_time,
                    "stored_path": attempt_key(asset.path, job.attempts),
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
        metadata["gpu_seconds"] = gpu_seconds
        expected = float(job.metadata.get("expected_generation_time") or 0)
        if expected > 0:
            metadata["performance_ratio"] = round(generated.generation_time / expected, 6)
        recorded = await self._record(
            lambda: self._repository.complete_job(
                job.id, job.attempts, metadata, completions, gpu_seconds
            )
        )
        if not recorded and await self._completed_by_this_attempt(job):
            recorded = True  # an earlier try of the write committed, its answer was lost
        self._log_fenced(job, recorded, "completion")
        if recorded:
            self._metrics.job_finished(
                job.job_type, "completed", generated.generation_time, expected or None
            )
            self._metrics.gpu_seconds_charged(job.queue, job.tier.value, gpu_seconds)
        else:
            # Cancelled, or a newer attempt owns the job: its files are the only ones kept.
            await self._delete_stored(job, stored, "its completion was fenced out")

    async def _completed_by_this_attempt(self, job: JobRecord) -> bool:
        current = await self._record(lambda: self._repository.job_attempt(job.id))
        return current == (JobStatus.COMPLETED, job.attempts)

    async def _delete_stored(self, job: JobRecord, stored: list[tuple[str, str]], why: str) -> None:
        """Delete this attempt's own files (attempt-scoped keys: never a newer attempt's)."""
        for bucket, key in stored:
            try:
                await self._storage.delete(bucket, key)
            except StorageError as exc:
                logger.error("could not delete %s/%s of job %s: %s", bucket, key, job.id, exc)
        if stored:
            logger.warning(
                "deleted the %d files job %s attempt %d stored: %s",
                len(stored),
                job.id,
                job.attempts,
                why,
            )

    async def _record_failure(
        self,
        job: JobRecord,
        error: Exception,
        claimed_at: float,
        metadata: dict[str, Any],
        gpu_seconds: float,
    ) -> None:
        logger.error("job %s (%s) failed: %r", job.id, job.job_type, error)
        message = (error.message if isinstance(error, OurVidzError) else str(error)) or type(
            error
        ).__name__
        patch = _timings(job, claimed_at) | metadata | {"gpu_seconds": gpu_seconds}
        recorded = await self._record(
            lambda: self._repository.fail_job(
                job.id, job.attempts, message, type(error).__name__, patch, gpu_seconds
            )
        )
        self._log_fenced(job, recorded, "failure")
        if recorded:
            self._metrics.job_finished(job.job_type, "failed")
            self._metrics.gpu_seconds_charged(job.queue, job.tier.value, gpu_seconds)

    @staticmethod
    def _log_fenced(job: JobRecord, recorded: bool, what: str) -> None:
        if not recorded:
            logger.warning(
                "the %s of job %s attempt %d was fenced out: a newer attempt owns the job",
                what,
                job.id,
                job.attempts,
            )

    async def _store_asset(
        self,
        job: JobRecord,
        asset: AssetRecord,
        output: EncodedAsset,
        stored: list[tuple[str, str]],
    ) -> None:
        """Store one file under this attempt's key, then tell SSE subscribers (a lost event is
        not worth a failure)."""
        thumbnail = _thumbnail(asset, job.attempts).get("thumbnail_path")
        if output.poster is not None and thumbnail:
            stored.append((asset.bucket, thumbnail))
            await self._put(asset.bucket, thumbnail, output.poster, "image/webp")
        key = attempt_key(asset.path, job.attempts)
        stored.append((asset.bucket, key))
        await self._put(asset.bucket, key, output.data, output.mime_type)
        try:
            await self._repository.publish_asset_stored(
                job.id, job.attempts, asset.index, asset.bucket, key
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

    async def _record(self, write: Callable[[], Awaitable[Recorded]]) -> Recorded:
        """Write an outcome, retrying while the database is unavailable: keep the result."""
        async for attempt in _retrying(
            DatabaseUnavailable,
            stop_after_delay(self._config.record_retry_s),
            "recording an outcome",
        ):
            with attempt:
                return await write()
        raise AssertionError("unreachable: AsyncRetrying reraises")

    async def _renew_leases(self) -> None:
        held = dict(self._held)
        if not held:
            return
        kept = await self._repository.heartbeat(held, self._config.lease_s)
        self._renewed_at = time.monotonic()
        for job_id in held.keys() - kept:
            # A job that finished while the heartbeat ran is no longer held: not a loss.
            if self._held.get(job_id) == held[job_id]:
                # Cancelled, or reaped and maybe claimed again: either way its outcome is
                # fenced out, so stop spending model time on it (a missed NOTIFY too).
                logger.warning(
                    "job %s attempt %d is no longer held (cancelled or lease lost)",
                    job_id,
                    held[job_id],
                )
                self._cancelled.add((job_id, held[job_id]))

    async def _refresh_backlog(self) -> None:
        self._backlog = await self._repository.queued_units(self._config.queue)

    async def _reap(self) -> None:
        await reap_once(self._repository, self._config.max_attempts)


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


def _thumbnail(asset: AssetRecord, attempt: int) -> dict[str, Any]:
    """The attempt's key for a video's poster frame (none for images)."""
    planned = asset.metadata.get("thumbnail_path")
    return {"thumbnail_path": attempt_key(str(planned), attempt)} if planned else {}


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
