"""OpenAI's Images, Videos and Models APIs as thin adapters over the job service.

An OpenAI request becomes an ordinary job (its rows, policy, limits, quotas, callbacks,
cancel and metrics are the job API's); this module only translates requests into
``JobRequest`` and jobs into OpenAI's objects. Refusals name the OpenAI field at fault
(``param``), so the SDKs raise them as they would OpenAI's own.
"""

from __future__ import annotations

import asyncio
import base64
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ourvidz_serve.catalog import (
    JOB_TYPES,
    WAN_FPS,
    WAN_MAX_FRAMES,
    JobTypeSpec,
    ModelFamily,
    OutputFormat,
    ReferenceType,
)
from ourvidz_serve.domain import AssetKind, JobStatus
from ourvidz_serve.errors import (
    GenerationFailed,
    Gone,
    InvalidRequest,
    NotFound,
    OurVidzError,
    TooManyWaitingRequests,
)
from ourvidz_serve.jobs.principal import Principal
from ourvidz_serve.jobs.protocol import LIFTED_FROM_METADATA, MAX_SEED, JobRequest, JobResource
from ourvidz_serve.jobs.service import JobService
from ourvidz_serve.persistence.repository import JobFilters, JobRepository, encode_cursor
from ourvidz_serve.prompts import MAX_PROMPT_CHARS
from ourvidz_serve.storage import Storage
from ourvidz_serve.storage.local import LocalStorage

DEFAULT_IMAGE_MODEL = "sdxl_image_fast"
DEFAULT_VIDEO_MODEL = "video_fast"
MODELS_CREATED = 1764892800
"""``created`` of every model: when these job types were first served (2025-12-05)."""
OWNED_BY = "ourvidz"
MAX_VIDEO_PAGE = 100
WAITING_RETRY_AFTER_S = 5.0

IMAGE_MODELS = tuple(name for name, spec in JOB_TYPES.items() if spec.format is OutputFormat.IMAGE)
VIDEO_MODELS = tuple(name for name, spec in JOB_TYPES.items() if spec.format is OutputFormat.VIDEO)
SDXL_MODELS = tuple(name for name, spec in JOB_TYPES.items() if spec.model is ModelFamily.SDXL)

# Job-API field names in a refusal, as the OpenAI request calls them.
_PARAM_NAMES = {"num_images": "n", "frame_num": "seconds", "job_type": "model", "user_id": "user"}


# --- OpenAI's objects ----------------------------------------------------------------------


class OpenAIError(BaseModel):
    message: str
    type: str = Field(
        description="invalid_request_error, authentication_error, permission_error, "
        "rate_limit_error or server_error"
    )
    param: str | None = Field(description="The request field at fault, where one is")
    code: str = Field(description="The job API's error code (e.g. prompt_refused)")
    job_id: str | None = Field(
        None, description="The job a timed-out or failed image request submitted"
    )


class OpenAIErrorBody(BaseModel):
    error: OpenAIError


class ModelObject(BaseModel):
    id: str = Field(description="A job type")
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ImageData(BaseModel):
    url: str | None = Field(None, description="Signed download URL (response_format=url)")
    b64_json: str | None = Field(None, description="The PNG, base64 (response_format=b64_json)")
    revised_prompt: str | None = Field(
        None, description="The prompt the model ran, where the enhancer rewrote it"
    )


class ImagesResponse(BaseModel):
    created: int = Field(description="When the job was submitted (Unix seconds)")
    data: list[ImageData]
    output_format: Literal["png"] = "png"
    size: str | None = Field(None, description="The images' size as generated, WIDTHxHEIGHT")
    job_id: UUID = Field(description="The job behind the images (GET /v1/jobs/{job_id})")


class VideoError(BaseModel):
    code: str
    message: str


class VideoObject(BaseModel):
    """OpenAI's Video object; ``id`` is the job's id."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: Literal["queued", "in_progress", "completed", "failed"] = Field(
        description="A cancelled job reads as failed, with error.code 'cancelled'"
    )
    progress: int = Field(ge=0, le=100, description="From the denoising steps recorded")
    created_at: int
    completed_at: int | None
    expires_at: int | None = None
    seconds: str = Field(description="The clip's length: frames over frames per second")
    size: str
    prompt: str
    error: VideoError | None
    remixed_from_video_id: str | None = None


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


@dataclass(frozen=True)
class VideoContent:
    media_type: str
    path: Path | None = None
    """A local file (local storage)."""
    url: str | None = None
    """A signed URL (object storage)."""


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


# --- Requests --------------------------------------------------------------------------------


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    user: str | None = Field(
        None, description="The end user's id (a UUID); required with a service API key"
    )
    user_id: UUID | None = Field(None, description="Same as user")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    metadata: dict[str, Any] = Field(default_factory=dict)


_Request = TypeVar("_Request", bound=_OpenAIRequest)


class ImageGenerationRequest(_OpenAIRequest):
    """``POST /v1/images/generations``."""

    model: str = Field(
        DEFAULT_IMAGE_MODEL,
        description="An image job type",
        json_schema_extra={"enum": list(IMAGE_MODELS)},
    )
    n: int = Field(1, description="1, 3 or 6 for SDXL types; 1 for WAN types")
    size: str | None = Field(None, description="Only the job type's own size (or 'auto')")
    response_format: Literal["url", "b64_json"] = "url"
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)


class ImageEditRequest(ImageGenerationRequest):
    """``POST /v1/images/edits``, less the image: an SDXL reference job."""

    reference_type: ReferenceType = ReferenceType.STYLE
    reference_strength: float = Field(0.7, ge=0.1, le=1.0)


class VideoCreateRequest(_OpenAIRequest):
    """``POST /v1/videos`` (JSON or multipart form)."""

    model: str = Field(
        DEFAULT_VIDEO_MODEL,
        description="A video job type",
        json_schema_extra={"enum": list(VIDEO_MODELS)},
    )
    seconds: str | float | None = Field(
        None,
        description=f"Clip length; rounded to the nearest valid frame count at {WAN_FPS} fps "
        f"(4k+1 frames, at most {WAN_MAX_FRAMES})",
    )
    size: str | None = Field(None, description="Only the job type's own size (or 'auto')")
    input_reference: Any = Field(
        None, description="Not supported: text-to-video only (refused with 400)"
    )


def parse_request(model: type[_Request], data: Mapping[str, Any]) -> _Request:
    """``model`` from ``data``; a refusal names the first field at fault."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise _invalid(exc) from None


def _invalid(exc: ValidationError) -> InvalidRequest:
    error = exc.errors()[0]
    loc = [str(part) for part in error.get("loc", ())]
    param = _PARAM_NAMES.get(loc[0], loc[0]) if loc else None
    message = error.get("msg", "invalid request")
    if message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
    where = ".".join([param, *loc[1:]]) if param else ""
    return InvalidRequest(f"{where}: {message}" if where else message, param=param)


# --- Translation --------------------------------------------------------------------------------


def model_object(job_type: str) -> ModelObject:
    return ModelObject(id=job_type, created=MODELS_CREATED, owned_by=OWNED_BY)


def size_of(spec: JobTypeSpec) -> str:
    return f"{spec.width}x{spec.height}"


def _spec_for(model: str, allowed: tuple[str, ...], kind: str) -> JobTypeSpec:
    if model not in allowed:
        raise InvalidRequest(
            f"model {model!r} is not {kind} model here; expected one of {list(allowed)}",
            param="model",
        )
    return JOB_TYPES[model]


def _check_size(size: str | None, spec: JobTypeSpec) -> None:
    if size is not None and size not in ("auto", size_of(spec)):
        raise InvalidRequest(
            f"size {size!r} is not available for {spec.job_type}; its size is {size_of(spec)}",
            param="size",
        )


def _end_user(request: _OpenAIRequest) -> UUID | None:
    if request.user is None:
        return request.user_id
    try:
        user = UUID(request.user)
    except ValueError:
        raise InvalidRequest("user must be the end user's id, a UUID", param="user") from None
    if request.user_id is not None and request.user_id != user:
        raise InvalidRequest("user and user_id name different users", param="user")
    return user


def _require_end_user(request: JobRequest, principal: Principal) -> None:
    if principal.is_service and request.user_id is None:
        raise InvalidRequest(
            "user (the end user's id) is required with a service API key", param="user"
        )


def _job_request(fields: dict[str, Any]) -> JobRequest:
    """The job API's request; its refusals are renamed to the OpenAI fields."""
    # The job API lifts generation options out of metadata (the seed's payload shape); here
    # they are fields of their own, or not offered (a reference URL), and metadata is the
    # client's alone.
    options = sorted(LIFTED_FROM_METADATA.intersection(fields.get("metadata") or {}))
    if options:
        raise InvalidRequest(
            f"metadata may not carry {options}: give them as fields of the request",
            param="metadata",
        )
    try:
        return JobRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise _invalid(exc) from None


def image_job(request: ImageGenerationRequest) -> JobRequest:
    return _image_job(request, IMAGE_MODELS, {}, "an image")


def edit_job(request: ImageEditRequest) -> JobRequest:
    """An SDXL reference job, checked before its upload is stored; the caller then sets
    ``reference_image_key`` to the stored upload."""
    reference = {
        "reference_type": request.reference_type,
        "reference_strength": request.reference_strength,
    }
    return _image_job(request, SDXL_MODELS, reference, "an SDXL image")


def _image_job(
    request: ImageGenerationRequest, models: tuple[str, ...], extra: dict[str, Any], kind: str
) -> JobRequest:
    spec = _spec_for(request.model, models, kind)
    if request.n not in spec.allowed_num_images:
        raise InvalidRequest(
            f"n={request.n} is not available for {spec.job_type}; "
            f"allowed: {list(spec.allowed_num_images)}",
            param="n",
        )
    _check_size(request.size, spec)
    if request.negative_prompt is not None and spec.model is not ModelFamily.SDXL:
        raise InvalidRequest(
            f"negative_prompt is only supported by SDXL models, not {spec.job_type}",
            param="negative_prompt",
        )
    fields: dict[str, Any] = {
        "job_type": spec.job_type,
        "prompt": request.prompt,
        "user_id": _end_user(request),
        "num_images": request.n,
        "seed": request.seed,
        "negative_prompt": request.negative_prompt,
        "metadata": request.metadata,
        **extra,
    }
    return _job_request(fields)


def frames_for(seconds: str | float | None) -> int | None:
    """The frames a clip of ``seconds`` needs at WAN's fps (None: the job type's default)."""
    if seconds is None:
        return None
    try:
        value = float(seconds)
    except ValueError:
        raise InvalidRequest(
            f"seconds must be a number, not {seconds!r}", param="seconds"
        ) from None
    longest = WAN_MAX_FRAMES / WAN_FPS
    if not math.isfinite(value) or value <= 0 or value > longest:
        raise InvalidRequest(
            f"seconds must be more than 0 and at most {longest:g} "
            f"({WAN_MAX_FRAMES} frames at {WAN_FPS} fps)",
            param="seconds",
        )
    # Planning rounds it to the nearest count WAN can make and records both.
    return max(1, round(value * WAN_FPS))


def video_job(request: VideoCreateRequest) -> JobRequest:
    spec = _spec_for(request.model, VIDEO_MODELS, "a video")
    if request.input_reference is not None:
        raise InvalidRequest(
            "input_reference is not supported: videos here are text-to-video only",
            param="input_reference",
        )
    _check_size(request.size, spec)
    frames = frames_for(request.seconds)
    fields: dict[str, Any] = {
        "job_type": spec.job_type,
        "prompt": request.prompt,
        "user_id": _end_user(request),
        "seed": request.seed,
        "frame_num": frames,
        "metadata": request.metadata,
    }
    return _job_request(fields)


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unix(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def video_object(job: JobResource) -> VideoObject:
    spec = JOB_TYPES[job.job_type]
    frames = int(job.metadata.get("frame_num", spec.num_frames))
    status: Literal["queued", "in_progress", "completed", "failed"]
    error = None
    progress = 0
    if job.status is JobStatus.QUEUED:
        status = "queued"
    elif job.status is JobStatus.PROCESSING:
        status = "in_progress"
        if job.progress is not None and job.progress.total > 0:
            # 100 only once the file is stored: the last step is not the end.
            progress = min(99, job.progress.step * 100 // job.progress.total)
    elif job.status is JobStatus.COMPLETED:
        status, progress = "completed", 100
    else:
        status = "failed"
        if job.status is JobStatus.CANCELLED:
            error = VideoError(code="cancelled", message="the video was cancelled")
        else:
            code = str(job.metadata.get("error_type") or "generation_failed")
            error = VideoError(code=code, message=job.error_message or "the generation failed")
    return VideoObject(
        id=str(job.id),
        model=job.job_type,
        status=status,
        progress=progress,
        created_at=int(job.created_at.timestamp()),
        completed_at=_unix(job.completed_at),
        expires_at=_unix(job.expired_at),
        seconds=f"{frames / WAN_FPS:.2f}".rstrip("0").rstrip("."),
        size=size_of(spec),
        prompt=job.prompt,
        error=error,
    )


def raise_unless_completed(job: JobResource) -> None:
    """A waiting request's job that did not complete is a server-side failure to report."""
    if job.status is JobStatus.COMPLETED:
        return
    reason = "was cancelled" if job.status is JobStatus.CANCELLED else "failed"
    detail = f": {job.error_message}" if job.error_message else ""
    raise GenerationFailed(
        f"job {job.id} {reason}{detail}",
        details={"job_id": str(job.id), "status": job.status.value},
    )


# --- The service ---------------------------------------------------------------------------------


class OpenAICompatService:
    """The OpenAI routes' work, callable without HTTP."""

    def __init__(
        self,
        jobs: JobService,
        repository: JobRepository,
        storage: Storage,
        *,
        wait_s: float,
        max_waiting: int,
    ) -> None:
        self._jobs = jobs
        self._repository = repository
        self._storage = storage
        self._wait_s = wait_s
        self._max_waiting = max_waiting
        self._waiting = 0

    def models(self) -> ModelList:
        return ModelList(data=[model_object(name) for name in JOB_TYPES])

    def model(self, model_id: str) -> ModelObject:
        if model_id not in JOB_TYPES:
            raise NotFound(f"no model {model_id!r}", param="model")
        return model_object(model_id)

    async def generate_images(
        self,
        request: JobRequest,
        principal: Principal,
        response_format: str,
        idempotency_key: str | None,
        recorded: dict[str, Any],
        reference_upload: bytes | None = None,
    ) -> ImagesResponse:
        """Submit the job, wait for it, answer its images. A client that goes away loses
        nothing: the job is already stored, finishes, and stays in the user's jobs.

        At most ``max_waiting`` requests wait at once on this replica (each holds one of the
        ingress's ongoing requests); past it, a 429 before anything is stored. Any error
        once the job is stored names it (``details.job_id``), so a client can find it and is
        told not to retry into a second job.
        """
        _require_end_user(request, principal)
        if self._waiting >= self._max_waiting:
            raise TooManyWaitingRequests(
                f"{self._waiting} image requests are waiting on this replica already; retry, "
                "or submit with POST /v1/jobs and follow its events",
                retry_after_s=WAITING_RETRY_AFTER_S,
            )
        self._waiting += 1
        try:
            job, _created = await self._jobs.submit(
                request,
                principal,
                idempotency_key,
                openai_request=recorded,
                reference_upload=reference_upload,
            )
            try:
                finished = await self._jobs.wait_until_finished(job.id, principal, self._wait_s)
                raise_unless_completed(finished)
                return await self._images_of(finished, response_format)
            except OurVidzError as exc:
                if exc.details is None or isinstance(exc.details, dict):
                    exc.details = {**(exc.details or {}), "job_id": str(job.id)}
                raise
        finally:
            self._waiting -= 1

    async def _images_of(self, finished: JobResource, response_format: str) -> ImagesResponse:
        images = [asset for asset in finished.assets if asset.kind is AssetKind.IMAGE]
        if response_format == "b64_json":
            blobs = await asyncio.gather(
                *(self._storage.get(asset.bucket, asset.path) for asset in images)
            )
            # Encoding megabytes is CPU work: off the event loop.
            encoded = await asyncio.gather(*(asyncio.to_thread(_base64, blob) for blob in blobs))
            data = [ImageData(b64_json=text) for text in encoded]
        else:
            data = [ImageData(url=asset.url) for asset in images]
        revised = finished.metadata.get("enhanced_prompt")
        if isinstance(revised, str):
            for item in data:
                item.revised_prompt = revised
        width = finished.metadata.get("output_width")
        height = finished.metadata.get("output_height")
        return ImagesResponse(
            created=int(finished.created_at.timestamp()),
            data=data,
            size=f"{width}x{height}" if width and height else None,
            job_id=finished.id,
        )

    async def create_video(
        self,
        request: JobRequest,
        principal: Principal,
        idempotency_key: str | None,
        recorded: dict[str, Any],
    ) -> VideoObject:
        _require_end_user(request, principal)
        job, _created = await self._jobs.submit(
            request, principal, idempotency_key, openai_request=recorded
        )
        return video_object(job)

    async def _video(self, video_id: str, principal: Principal) -> JobResource:
        """The visible video job, or ``NotFound`` (another user's, an image job, a bad id)."""
        try:
            job_id = UUID(video_id)
        except ValueError:
            raise NotFound(f"no video {video_id!r}") from None
        try:
            job = await self._jobs.resource(job_id, principal)
        except NotFound:
            raise NotFound(f"no video {video_id!r}") from None
        if job.job_type not in VIDEO_MODELS:
            raise NotFound(f"no video {video_id!r}")
        return job

    async def get_video(self, video_id: str, principal: Principal) -> VideoObject:
        return video_object(await self._video(video_id, principal))

    async def list_videos(
        self,
        principal: Principal,
        *,
        after: str | None,
        limit: int,
        order: Literal["asc", "desc"],
        user_id: UUID | None,
    ) -> VideoList:
        """The caller's videos (a service key: all, or one user's), newest first by default;
        ``after`` is the last id of the previous page."""
        if not 1 <= limit <= MAX_VIDEO_PAGE:
            raise InvalidRequest(f"limit must be between 1 and {MAX_VIDEO_PAGE}", param="limit")
        owner = user_id if principal.is_service else principal.acting_for(user_id)
        cursor = None
        if after is not None:
            last = await self._video(after, principal)
            cursor = encode_cursor(last.created_at, last.id)
        filters = JobFilters(user_id=owner, job_types=VIDEO_MODELS)
        jobs, next_cursor = await self._repository.list_jobs(
            filters, limit, cursor, oldest_first=order == "asc"
        )
        resources = await asyncio.gather(*(self._jobs.to_resource(job) for job in jobs))
        videos = [video_object(job) for job in resources]
        return VideoList(
            data=videos,
            first_id=videos[0].id if videos else None,
            last_id=videos[-1].id if videos else None,
            has_more=next_cursor is not None,
        )

    async def delete_video(self, video_id: str, principal: Principal) -> VideoDeleted:
        job = await self._video(video_id, principal)
        await self._jobs.delete_files(job.id, principal)
        return VideoDeleted(id=str(job.id))

    async def video_content(
        self, video_id: str, principal: Principal, variant: str
    ) -> VideoContent:
        """Where the MP4 or its WebP poster is: a local file to stream from disk, or a signed
        URL to send the client to (object storage serves the bytes, not the ingress)."""
        job = await self._video(video_id, principal)
        if variant not in ("video", "thumbnail"):
            raise InvalidRequest(
                f"variant {variant!r} is not available; expected 'video' or 'thumbnail'",
                param="variant",
            )
        if job.expired_at is not None:
            raise Gone("the video's files were deleted", details={"job_id": str(job.id)})
        asset = next((a for a in job.assets if a.kind is AssetKind.VIDEO), None)
        if job.status is not JobStatus.COMPLETED or asset is None:
            raise InvalidRequest(
                f"video {video_id} is {video_object(job).status}: its content exists once "
                "it is completed",
                param="video_id",
            )
        key, media_type = asset.path, "video/mp4"
        if variant == "thumbnail":
            poster = asset.metadata.get("thumbnail_path")
            if not poster:
                raise NotFound(f"video {video_id} has no thumbnail")
            key, media_type = str(poster), "image/webp"
        if isinstance(self._storage, LocalStorage):
            path = await self._storage.open_for_download(asset.bucket, key)
            return VideoContent(media_type, path=path)
        return VideoContent(media_type, url=await self._storage.signed_url(asset.bucket, key))
