"""The jobs service: submit, read and list jobs. Callable without HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

from ourvidz_serve.catalog import JOB_TYPES
from ourvidz_serve.errors import Conflict, Forbidden, GenerationTimeout, InvalidRequest, NotFound
from ourvidz_serve.jobs.events import JobEventHub
from ourvidz_serve.jobs.limits import RateLimiter
from ourvidz_serve.jobs.loras import LoraService
from ourvidz_serve.jobs.planning import plan_job
from ourvidz_serve.jobs.principal import Principal
from ourvidz_serve.jobs.protocol import (
    AssetResource,
    CallbackDelivery,
    JobList,
    JobRequest,
    JobResource,
    JobStatus,
)
from ourvidz_serve.jobs.references import ReferenceService
from ourvidz_serve.jobs.retention import delete_keys
from ourvidz_serve.jobs.scheduling import QueueService, SchedulingPolicy, tier_of
from ourvidz_serve.observability.metrics import NO_METRICS, Metrics
from ourvidz_serve.persistence.repository import AssetRecord, JobFilters, JobRecord, JobRepository
from ourvidz_serve.security.prompt_policy import PromptPolicy
from ourvidz_serve.storage import Storage

TERMINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
_TERMINAL = frozenset(status.value for status in TERMINAL_STATUSES)
EVENTS_RECHECK_S = 5.0
MAX_PAGE_SIZE = 100
MAX_IDEMPOTENCY_KEY_CHARS = 255


class JobService:
    def __init__(
        self,
        repository: JobRepository,
        storage: Storage,
        *,
        references: ReferenceService,
        loras: LoraService,
        policy: PromptPolicy,
        limiter: RateLimiter,
        events: JobEventHub,
        max_queued_jobs: int = 0,
        queued_jobs_retry_after_s: float = 15.0,
        metrics: Metrics = NO_METRICS,
        callbacks: bool = False,  # a callback URL is configured: every job submitted owes one
        scheduling: SchedulingPolicy | None = None,
        queues: QueueService | None = None,
    ) -> None:
        self._repository = repository
        self._loras = loras
        self._queues = queues
        self._scheduling = scheduling or SchedulingPolicy()
        self._callbacks = callbacks
        self._metrics = metrics
        self._storage = storage
        self._references = references
        self._policy = policy
        self._limiter = limiter
        self._events = events
        self._max_queued_jobs = max_queued_jobs
        self._queued_jobs_retry_after_s = queued_jobs_retry_after_s

    async def submit(
        self,
        request: JobRequest,
        principal: Principal,
        idempotency_key: str | None = None,
        *,
        openai_request: dict[str, Any] | None = None,
        reference_upload: bytes | None = None,
    ) -> tuple[JobResource, bool]:
        """Check, persist the job and its asset rows; return ``(job, created)``.

        Every refusal (policy, limits, reference) comes before the job row exists, and the
        cheap checks come before the reference URL is fetched.
        """
        user_id = principal.acting_for(request.user_id)
        tier = tier_of(principal, request.tier)
        if (
            idempotency_key is not None
            and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS
        ):
            raise InvalidRequest(
                f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters"
            )
        await self._policy.check_request(request.prompt, request.negative_prompt)
        if principal.is_service:
            await self._limiter.spend_for_user(user_id)
        lora_digests = await self._loras.resolve(request.loras)
        if request.reference_image_key is not None:
            await self._references.ensure_usable(request.reference_image_key, user_id)
        elif request.reference_image_url is not None:
            stored = await self._references.fetch(request.reference_image_url, user_id)
            request = request.model_copy(update={"reference_image_key": stored.key})
        elif reference_upload is not None:
            # An upload with the request (OpenAI's image edits): checked and stored like
            # POST /v1/references, after the cheap refusals.
            stored = await self._references.store(reference_upload, user_id)
            request = request.model_copy(update={"reference_image_key": stored.key})
        plan = plan_job(
            request,
            user_id,
            idempotency_key=idempotency_key,
            tier=tier,
            openai_request=openai_request,
            lora_digests=lora_digests,
        )
        # A user's quota is their own tier's, even for a job they lowered to bulk.
        quota = self._scheduling.quota(
            tier_of(principal, None) if not principal.is_service else tier
        )
        if quota is not None and plan.cost_s > quota.budget_s:
            # No wait would let it through: a 429 with Retry-After would be a lie.
            raise InvalidRequest(
                f"this job needs about {plan.cost_s:g} GPU seconds, more than the whole quota "
                f"of {quota.budget_s:g} s per {quota.window_s:g} s; ask for fewer images or "
                "a faster job type",
                details={"cost_s": plan.cost_s, "budget_s": quota.budget_s},
            )
        job, created = await self._repository.insert_job(
            plan,
            max_queued=self._max_queued_jobs,
            retry_after_s=self._queued_jobs_retry_after_s,
            owes_callback=self._callbacks,
            weight=self._scheduling.weight(tier),
            quota=quota,
        )
        if created:
            self._metrics.job_submitted(job.job_type)
        return await self.to_resource(job), created

    async def _visible(self, job_id: UUID, principal: Principal) -> JobRecord:
        """The job's record if ``principal`` may see it; ``NotFound`` otherwise."""
        job = await self._repository.get_job(job_id)
        if job is None or not principal.can_see(job):
            raise NotFound(f"job {job_id} not found")
        return job

    async def get(self, job_id: UUID, principal: Principal) -> JobResource:
        job = await self._visible(job_id, principal)
        resource = await self.to_resource(job)
        deliveries = await self._repository.callback_deliveries(job_id)
        resource.callbacks = [CallbackDelivery.model_validate(row) for row in deliveries]
        estimate = await self._queues.estimate(job) if self._queues is not None else None
        if estimate is not None:
            resource.queue_position, resource.estimated_start_at = estimate
        return resource

    async def cancel(self, job_id: UUID, principal: Principal) -> JobResource:
        """Cancel a queued or running job (a running one stops at its next step).

        Cancelling a cancelled job answers it again; a completed or failed one is a conflict.
        """
        job = await self._visible(job_id, principal)
        was = await self._repository.cancel_job(job_id)
        if was in (JobStatus.QUEUED, JobStatus.PROCESSING):
            self._metrics.job_finished(job.job_type, JobStatus.CANCELLED.value)
        if was in (JobStatus.COMPLETED, JobStatus.FAILED):
            raise Conflict(
                f"job {job_id} has already ended {was.value}",
                details={"status": was.value},
            )
        return await self.get(job_id, principal)

    async def wait_until_finished(
        self, job_id: UUID, principal: Principal, timeout_s: float
    ) -> JobResource:
        """The job once it has ended, told by the event hub (no polling loop: the row is read
        when a terminal status arrives, and every ``EVENTS_RECHECK_S`` in case a notification
        was lost). Past ``timeout_s``, ``GenerationTimeout`` naming the job, which goes on."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        async with self._events.subscribe(job_id) as queue:
            # Subscribed before reading, so an end between the two is not missed.
            job = await self._visible(job_id, principal)
            while job.status not in TERMINAL_STATUSES:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise GenerationTimeout(
                        f"job {job_id} has not finished after {timeout_s:g} s; it goes on: "
                        f"fetch it from GET /v1/jobs/{job_id}",
                        details={"job_id": str(job_id), "status": job.status.value},
                    )
                try:
                    # One deadline, no timeout nested in another: neither can swallow the other.
                    event = await asyncio.wait_for(queue.get(), min(EVENTS_RECHECK_S, remaining))
                except TimeoutError:
                    job = await self._visible(job_id, principal)
                    continue
                if event.get("type") == "status" and event.get("status") in _TERMINAL:
                    job = await self._visible(job_id, principal)
        return await self.to_resource(job)

    async def resource(self, job_id: UUID, principal: Principal) -> JobResource:
        """The job as ``get`` answers it, without its callbacks and place in the queue."""
        return await self.to_resource(await self._visible(job_id, principal))

    async def delete_files(self, job_id: UUID, principal: Principal) -> None:
        """Cancel the job if unfinished, delete every file it stored, and mark it expired
        (its downloads answer 410 from then on). Its rows stay: it is still the user's job.

        Files first, then the mark, so that a retry after a storage error finishes the work.
        A job that was running is not marked: its cancelled attempt may still store a file
        (it deletes what it stores once fenced out, and the retention sweep's orphan pass
        looks only at unexpired jobs, so it stays their safety net).
        """
        job = await self._visible(job_id, principal)
        was = await self._repository.cancel_job(job_id)
        if was in (JobStatus.QUEUED, JobStatus.PROCESSING):
            self._metrics.job_finished(job.job_type, JobStatus.CANCELLED.value)
        bucket = JOB_TYPES[job.job_type].bucket
        keys = await self._storage.list_keys(bucket, f"{job.user_id}/{job.id}")
        await delete_keys(self._storage, bucket, keys)
        if was is not JobStatus.PROCESSING:
            await self._repository.mark_expired([job_id])

    async def events(
        self, job_id: UUID, principal: Principal
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """``(event, data)`` of a job: its current state first, then each change, until it
        ends. ``status`` on every change, ``progress`` ``{step, total}``, ``asset``
        ``{index, url}`` as each file is stored; the last is the terminal ``status``.

        Events are notifications, and one sent while this replica's listener was reconnecting
        is gone; so a stream with nothing new for ``EVENTS_RECHECK_S`` reads the job again.
        """
        async with self._events.subscribe(job_id) as queue:
            # Subscribed before reading, so no change between the two is missed.
            job = await self._visible(job_id, principal)
            last_status = job.status
            if job.status not in TERMINAL_STATUSES:
                yield "status", {"status": job.status.value}
                if job.progress is not None and job.status is JobStatus.PROCESSING:
                    yield "progress", {"step": job.progress["step"], "total": job.progress["total"]}
            sent_assets: set[int] = set()
            while job.status not in TERMINAL_STATUSES:
                try:
                    event = await asyncio.wait_for(queue.get(), EVENTS_RECHECK_S)
                except TimeoutError:
                    job = await self._visible(job_id, principal)
                    if job.status is not last_status and job.status not in TERMINAL_STATUSES:
                        last_status = job.status
                        yield "status", {"status": job.status.value}
                    continue
                kind = event.get("type")
                if kind == "status":
                    status = JobStatus(event["status"])
                    if status in TERMINAL_STATUSES:
                        job = await self._visible(job_id, principal)
                    elif status is not last_status:
                        last_status = status
                        yield "status", {"status": status.value}
                elif kind == "progress":
                    yield "progress", {"step": event["step"], "total": event["total"]}
                elif kind == "asset":
                    url = await self._storage.signed_url(event["bucket"], event["path"])
                    sent_assets.add(int(event["index"]))
                    yield "asset", {"index": event["index"], "url": url}
            # The end: any stored file not announced yet (a late subscriber: all), then the
            # terminal status.
            for asset in (await self.to_resource(job)).assets:
                if asset.url is not None and asset.index not in sent_assets:
                    yield "asset", {"index": asset.index, "url": asset.url}
            yield "status", {"status": job.status.value}

    async def list(
        self,
        principal: Principal,
        *,
        user_id: UUID | None,
        status: JobStatus | None,
        job_type: str | None,
        limit: int,
        cursor: str | None,
    ) -> JobList:
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE_SIZE}")
        if not principal.is_service:
            if user_id is not None and user_id != principal.user_id:
                raise Forbidden("a user may only list their own jobs")
            user_id = principal.user_id
        filters = JobFilters(user_id=user_id, status=status, job_type=job_type)
        jobs, next_cursor = await self._repository.list_jobs(filters, limit, cursor)
        resources = await asyncio.gather(*(self.to_resource(job) for job in jobs))
        return JobList(jobs=list(resources), next_cursor=next_cursor)

    async def to_resource(self, job: JobRecord) -> JobResource:
        expired = job.expired_at is not None
        assets = await asyncio.gather(
            *(self._asset_resource(asset, expired) for asset in job.assets)
        )
        return JobResource(
            id=job.id,
            user_id=job.user_id,
            job_type=job.job_type,
            format=job.format,
            quality=job.quality,
            model_type=job.model_type,
            status=job.status,
            prompt=job.prompt,
            metadata=job.metadata,
            project_id=job.project_id,
            video_id=job.video_id,
            image_id=job.image_id,
            attempts=job.attempts,
            created_at=job.created_at,
            started_at=job.started_at,
            completed_at=job.completed_at,
            error_message=job.error_message,
            progress=job.progress,
            expired_at=job.expired_at,
            tier=job.tier,
            assets=list(assets),
        )

    async def _asset_resource(self, asset: AssetRecord, expired: bool = False) -> AssetResource:
        """The asset with signed URLs once completed; none once its job expired (the files
        are deleted)."""
        url = thumbnail_url = None
        if asset.status is JobStatus.COMPLETED and not expired:
            url = await self._storage.signed_url(asset.bucket, asset.path)
            if asset.metadata.get("thumbnail_path"):
                thumbnail = str(asset.metadata["thumbnail_path"])
                thumbnail_url = await self._storage.signed_url(asset.bucket, thumbnail)
        return AssetResource(
            id=asset.id,
            kind=asset.kind,
            index=asset.index,
            status=asset.status,
            bucket=asset.bucket,
            path=asset.path,
            url=url,
            thumbnail_url=thumbnail_url,
            seed=asset.seed,
            metadata=asset.metadata,
            completed_at=asset.completed_at,
        )
