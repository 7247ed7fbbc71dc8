"""Request and response models of the jobs API."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from ourvidz_serve.catalog import (
    JOB_TYPES,
    WAN_MAX_FRAMES,
    JobType,
    ModelFamily,
    OutputFormat,
    Quality,
    Queue,
    ReferenceType,
    Tier,
)
from ourvidz_serve.domain import AssetKind, JobStatus
from ourvidz_serve.prompts import MAX_PROMPT_CHARS

MAX_SEED = 2**32 - 1
MAX_METADATA_BYTES = 16_384
MAX_METADATA_DEPTH = 8
"""Nesting of client metadata (objects and arrays); the platform's own metadata is flat."""

# The seed's queue-job payload carried generation options inside `metadata`; they are lifted
# to the top level when the top level does not set them.
LIFTED_FROM_METADATA = frozenset(
    {
        "prompt",
        "seed",
        "num_images",
        "negative_prompt",
        "reference_image_url",
        "reference_image_key",
        "reference_type",
        "reference_strength",
        "frame_num",
    }
)


RESERVED_METADATA_KEYS = frozenset(
    {
        # written at submission (jobs.planning)
        "prompt", "job_type", "model_variant", "queue", "bucket", "seed", "num_images",
        "enhanced", "expected_generation_time", "content_type", "file_extension", "width",
        "height", "submitted_at", "prompt_length", "prompt_word_count", "negative_prompt",
        "negative_prompt_supported", "steps", "guidance_scale", "reference_image_key",
        "reference_image_url", "reference_type", "reference_strength", "frame_num",
        "frame_num_requested", "sample_steps", "sample_guide_scale", "sample_solver",
        "sample_shift", "fps", "openai_request", "loras",
        # written while and after running (workers)
        "attempt", "enhancement_time", "pipeline_batch_images", "queue_wait_time",
        "original_prompt", "enhanced_prompt", "enhancement_fallback",
        "enhancement_warning", "generation_time", "total_time", "generation_timestamp",
        "gpu_seconds", "output_width", "output_height", "batch_count", "performance_ratio",
        "error_type",
        "stopped_at_step", "total_steps", "denoising_finished_at", "requested_width",
        "requested_height", "step_cache", "step_cache_computed_calls",
        "step_cache_skipped_calls", "step_cache_calibration",
    }
)  # fmt: skip
"""Job metadata the service writes; a client's ``metadata`` may not set them."""


LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""A registry name: also checked by migration 0009's table."""
LORA_SCALE_RANGE = (-2.0, 2.0)
"""A LoRA's scale in a job: 0 is the base model, 1 the LoRA as trained, negative inverts it."""
MAX_LORAS_IN_REQUEST = 8
"""The schema's bound; the configured count (``OURVIDZ_SDXL_MAX_LORAS_PER_JOB``) is lower."""


class LoraChoice(BaseModel):
    """One LoRA of the registry applied to an SDXL job."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    name: str = Field(pattern=LORA_NAME_PATTERN, description="A name from GET /v1/loras")
    scale: float = Field(1.0, ge=LORA_SCALE_RANGE[0], le=LORA_SCALE_RANGE[1])


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        )
        if children is None:
            continue
        deepest = max(deepest, depth + 1)
        if deepest > MAX_METADATA_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


class JobRequest(BaseModel):
    """``POST /v1/jobs``. Accepts snake_case and the seed's camelCase (``jobType``, ...)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    job_type: str = Field(
        validation_alias=AliasChoices("job_type", "jobType"),
        description="One of the ten job types",
        # Documented as an enum; validated by _known_job_type, whose message lists them.
        json_schema_extra={"enum": [name for name in sorted(JOB_TYPES)]},
    )
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    user_id: UUID | None = Field(None, validation_alias=AliasChoices("user_id", "userId"))
    num_images: int | None = Field(
        None, strict=True, description="1, 3 or 6 for SDXL types; 1 for WAN"
    )
    seed: int | None = Field(None, strict=True, ge=0, le=MAX_SEED)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    reference_image_url: str | None = Field(None, max_length=2048)
    reference_image_key: str | None = Field(None, max_length=512)
    reference_type: ReferenceType = ReferenceType.STYLE
    reference_strength: float = Field(0.7, ge=0.1, le=1.0)
    frame_num: int | None = Field(None, strict=True, ge=1, le=WAN_MAX_FRAMES)
    project_id: UUID | None = Field(None, validation_alias=AliasChoices("project_id", "projectId"))
    video_id: UUID | None = Field(None, validation_alias=AliasChoices("video_id", "videoId"))
    image_id: UUID | None = Field(None, validation_alias=AliasChoices("image_id", "imageId"))
    metadata: dict[str, Any] = Field(default_factory=dict)
    loras: list[LoraChoice] = Field(
        default_factory=list,
        max_length=MAX_LORAS_IN_REQUEST,
        description="SDXL job types: LoRAs of the registry and their scales, applied in order",
    )
    tier: Tier | None = Field(
        None,
        description="Service tier (fair share and quota): any with a service key; a user's "
        "token sets theirs (its 'tier' claim, else standard), which the body may only lower",
    )

    @model_validator(mode="before")
    @classmethod
    def _lift_seed_payload_fields(cls, data: Any) -> Any:
        """Lift generation options out of ``metadata``; an explicit null means "absent"."""
        if not isinstance(data, dict):
            return data
        data = {key: value for key, value in data.items() if value is not None}
        if isinstance(data.get("metadata"), dict):
            metadata = dict(data["metadata"])
            for name in sorted(LIFTED_FROM_METADATA):
                value = metadata.pop(name, None)
                if value is not None and name not in data:
                    data[name] = value
            data["metadata"] = metadata
        return data

    @field_validator("job_type")
    @classmethod
    def _known_job_type(cls, value: str) -> str:
        if value not in JOB_TYPES:
            raise ValueError(f"unknown job type {value!r}; expected one of {sorted(JOB_TYPES)}")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_size_and_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted(RESERVED_METADATA_KEYS.intersection(value))
        if reserved:
            raise ValueError(f"metadata keys {reserved} are set by the service, not the client")
        if _depth(value) > MAX_METADATA_DEPTH:
            raise ValueError(f"metadata is nested more than {MAX_METADATA_DEPTH} levels deep")
        size = len(json.dumps(value, default=str).encode())
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"metadata is {size} bytes; at most {MAX_METADATA_BYTES} allowed")
        return value

    @model_validator(mode="after")
    def _options_fit_the_job_type(self) -> JobRequest:
        spec = JOB_TYPES[self.job_type]
        if self.num_images is not None and self.num_images not in spec.allowed_num_images:
            raise ValueError(
                f"num_images={self.num_images} is not allowed for {self.job_type}; "
                f"allowed: {list(spec.allowed_num_images)}"
            )
        if spec.model is not ModelFamily.SDXL:
            sdxl_only = ("negative_prompt", "reference_image_url", "reference_image_key")
            for name in (*sdxl_only, "reference_type", "reference_strength", "loras"):
                if name in self.model_fields_set:
                    raise ValueError(f"{name} is only supported by SDXL job types")
        if self.frame_num is not None and spec.format is not OutputFormat.VIDEO:
            raise ValueError("frame_num is only supported by WAN video job types")
        if self.reference_image_url is not None and self.reference_image_key is not None:
            raise ValueError("give reference_image_url or reference_image_key, not both")
        names = [lora.name for lora in self.loras]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"LoRAs {repeated} are named more than once; name each once")
        return self


class AssetResource(BaseModel):
    id: UUID
    kind: AssetKind
    index: int
    status: JobStatus
    bucket: str
    path: str = Field(description="Storage key inside the bucket")
    url: str | None = Field(None, description="Signed download URL, once completed")
    thumbnail_url: str | None = Field(
        None, description="A video's poster frame (WebP), signed, once completed"
    )
    seed: int | None
    metadata: dict[str, Any]
    completed_at: datetime | None


class CallbackAttempt(BaseModel):
    at: datetime
    attempt: int | None = None
    status_code: int | None = None
    error: str | None = None
    duration_s: float | None = None


class CallbackDelivery(BaseModel):
    event: str
    webhook_id: str = Field(description="The webhook-id header: stable per job and event")
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    history: list[CallbackAttempt]


class JobProgress(BaseModel):
    step: int
    total: int
    at: datetime


class JobResource(BaseModel):
    id: UUID
    user_id: UUID
    job_type: JobType
    format: OutputFormat
    quality: Quality
    model_type: str
    status: JobStatus
    prompt: str
    metadata: dict[str, Any]
    project_id: UUID | None
    video_id: UUID | None
    image_id: UUID | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    error_message: str | None
    progress: JobProgress | None = Field(
        None, description="The latest denoising step its worker recorded while it ran"
    )
    expired_at: datetime | None = Field(
        None,
        description="When retention deleted its files: its assets then have no URLs and "
        "their downloads answer 410",
    )
    assets: list[AssetResource]
    callbacks: list[CallbackDelivery] = Field(
        default_factory=list,
        description="Callback deliveries owed for this job and every attempt (GET only)",
    )
    tier: Tier = Field(Tier.STANDARD, description="Its service tier: its weight in fair order")
    queue_position: int | None = Field(
        None,
        description="A queued job's approximate place in its queue's fair order (0: next); "
        "counted up to a cap (GET only)",
    )
    estimated_start_at: datetime | None = Field(
        None,
        description="When a queued job is expected to start: the expected GPU time of the jobs "
        "ahead of it spread over the queue's replicas (GET only)",
    )


class JobList(BaseModel):
    jobs: list[JobResource]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page")


class CallbackPayload(BaseModel):
    """The seed's standardized callback body, POSTed when a job ends."""

    job_id: UUID
    status: JobStatus
    assets: list[str] = Field(description="Stored paths of the assets, in index order")
    error_message: str | None
    metadata: dict[str, Any]


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class JobTypeResource(BaseModel):
    job_type: JobType
    model: str
    model_type: str
    model_variant: str
    format: OutputFormat
    quality: Quality
    enhanced: bool
    queue: str
    bucket: str
    file_extension: str
    steps: int
    guidance_scale: float
    width: int
    height: int
    num_frames: int
    fps: int | None
    allowed_num_images: list[int]
    expected_time_s: float


class TierQueueStatus(BaseModel):
    tier: Tier
    queued: int = Field(description="Jobs waiting (counted up to a cap)")
    running: int
    oldest_wait_s: float | None = Field(description="How long the oldest waiting job has waited")
    backlog_gpu_seconds: float = Field(description="Expected GPU seconds of the waiting jobs")


class QueueStatus(BaseModel):
    """One queue as the service key sees it (``GET /v1/queues``)."""

    queue: Queue
    replicas: int | None = Field(
        description="Running replicas of the queue's deployment (null: Serve did not answer)"
    )
    queued: int
    running: int
    oldest_wait_s: float | None
    backlog_gpu_seconds: float
    tiers: list[TierQueueStatus] = Field(description="The same figures per tier")


class QueueList(BaseModel):
    queues: list[QueueStatus]


class UsageResource(BaseModel):
    """A user's GPU time in the quota's rolling window (``GET /v1/usage``)."""

    user_id: UUID
    tier: Tier
    window_s: float = Field(description="The rolling window GPU time is counted over")
    spent_gpu_seconds: float = Field(
        description="Charged in the window: measured generation time times the GPU share"
    )
    reserved_gpu_seconds: float = Field(
        description="Expected GPU seconds of the user's unfinished jobs, held against the quota"
    )
    budget_gpu_seconds: float | None = Field(description="The tier's quota (null: none)")
    remaining_gpu_seconds: float | None = Field(
        description="What a new job may still use (null: no quota)"
    )
