"""The jobs service: submit, read and list jobs. Callable without HTTP."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from uuid import UUID

from ourvidz_serve.errors import Forbidden, InvalidRequest, NotFound
from ourvidz_serve.jobs.planning import plan_job
from ourvidz_serve.jobs.protocol import (
    AssetResource,
    JobList,
    JobRequest,
    JobResource,
    JobStatus,
)
from ourvidz_serve.persistence.repository import AssetRecord, JobFilters, JobRecord, JobRepository
from ourvidz_serve.storage import REFERENCE_IMAGES_BUCKET, Storage

MAX_PAGE_SIZE = 100
MAX_IDEMPOTENCY_KEY_CHARS = 255


@dataclass(frozen=True)
class Principal:
    """Who is calling: the platform's backend (service key) or one user (JWT)."""

    user_id: UUID | None
    is_service: bool

    def can_see(self, job: JobRecord) -> bool:
        return self.is_service or job.user_id == self.user_id


class JobService:
    def __init__(self, repository: JobRepository, storage: Storage) -> None:
        self._repository = repository
        self._storage = storage

    async def submit(
        self, request: JobRequest, principal: Principal, idempotency_key: str | None = None
    ) -> tuple[JobResource, bool]:
        """Persist the job and its asset rows; return ``(job, created)``."""
        user_id = self._user_for_submission(request, principal)
        if (
            idempotency_key is not None
            and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS
        ):
            raise InvalidRequest(
                f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters"
            )
        if request.reference_image_key is not None and not await self._storage.exists(
            REFERENCE_IMAGES_BUCKET, request.reference_image_key
        ):
            raise InvalidRequest(
                "reference_image_key does not name an object in reference_images",
                details={"reference_image_key": request.reference_image_key},
            )
        plan = plan_job(request, user_id, idempotency_key=idempotency_key)
        job, created = await self._repository.insert_job(plan)
        return await self.to_resource(job), created

    def _user_for_submission(self, request: JobRequest, principal: Principal) -> UUID:
        if principal.is_service:
            if request.user_id is None:
                raise InvalidRequest("user_id is required with a service API key")
            return request.user_id
        assert principal.user_id is not None
        if request.user_id is not None and request.user_id != principal.user_id:
            raise Forbidden("user_id does not match the authenticated user")
        return principal.user_id

    async def get(self, job_id: UUID, principal: Principal) -> JobResource:
        job = await self._repository.get_job(job_id)
        if job is None or not principal.can_see(job):
            raise NotFound(f"job {job_id} not found")
        return await self.to_resource(job)

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
        assets = await asyncio.gather(*(self._asset_resource(asset) for asset in job.assets))
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
            assets=list(assets),
        )

    async def _asset_resource(self, asset: AssetRecord) -> AssetResource:
        url = None
        if asset.status is JobStatus.COMPLETED:
            url = await self._storage.signed_url(asset.bucket, asset.path)
        return AssetResource(
            id=asset.id,
            kind=asset.kind,
            index=asset.index,
            status=asset.status,
            bucket=asset.bucket,
            path=asset.path,
            url=url,
            seed=asset.seed,
            metadata=asset.metadata,
            completed_at=asset.completed_at,
        )
