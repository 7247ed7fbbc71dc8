"""The ten job types and their defaults: the one place they are defined."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class ModelFamily(StrEnum):
    SDXL = "sdxl"
    WAN = "wan"


class OutputFormat(StrEnum):
    IMAGE = "image"
    VIDEO = "video"


class Quality(StrEnum):
    FAST = "fast"
    HIGH = "high"


class Queue(StrEnum):
    SDXL = "sdxl_queue"
    WAN = "wan_queue"


class Tier(StrEnum):
    """A job's service tier: its weight in fair order and its GPU-time quota."""

    PREMIUM = "premium"
    STANDARD = "standard"
    BULK = "bulk"


class ReferenceType(StrEnum):
    """What an SDXL reference image steers: its style, its composition or a character."""

    STYLE = "style"
    COMPOSITION = "composition"
    CHARACTER = "character"


class StepCache(StrEnum):
    """diffusers' step caches for WAN's transformer (opt-in per job type)."""

    FIRST_BLOCK = "first_block"
    MAG = "mag"
    TAYLOR_SEER = "taylor_seer"


SDXL_NUM_IMAGES = (1, 3, 6)
WAN_FPS = 16
WAN_SAMPLE_SOLVER = "unipc"
WAN_SAMPLE_SHIFT = 5.0
WAN_MAX_FRAMES = 121


class JobTypeSpec(BaseModel):
    """Everything that follows from a job type's name."""

    model_config = ConfigDict(frozen=True)

    job_type: str
    model: ModelFamily
    format: OutputFormat
    quality: Quality
    enhanced: bool
    steps: int
    guidance_scale: float
    width: int
    height: int
    num_frames: int
    allowed_num_images: tuple[int, ...]
    expected_time_s: float
    """The seed's expected generation time on an RTX 6000 Ada (per job)."""

    @property
    def model_type(self) -> str:
        """The seed's ``jobs.model_type`` / ``images.metadata.model_type``."""
        if self.model is ModelFamily.SDXL:
            return "sdxl"
        return "enhanced-7b" if self.enhanced else "wan"

    @property
    def model_variant(self) -> str:
        return "lustify_sdxl" if self.model is ModelFamily.SDXL else "wan_2_1_1_3b"

    @property
    def queue(self) -> Queue:
        return Queue.SDXL if self.model is ModelFamily.SDXL else Queue.WAN

    @property
    def bucket(self) -> str:
        return self.job_type

    @property
    def file_extension(self) -> str:
        return "mp4" if self.format is OutputFormat.VIDEO else "png"

    @property
    def content_type(self) -> str:
        return self.format.value

    @property
    def mime_type(self) -> str:
        return "video/mp4" if self.format is OutputFormat.VIDEO else "image/png"


def _sdxl(quality: Quality, steps: int, guidance: float, expected_per_image: float) -> JobTypeSpec:
    return JobTypeSpec(
        job_type=f"sdxl_image_{quality.value}",
        model=ModelFamily.SDXL,
        format=OutputFormat.IMAGE,
        quality=quality,
        enhanced=False,
        steps=steps,
        guidance_scale=guidance,
        width=1024,
        height=1024,
        num_frames=1,
        allowed_num_images=SDXL_NUM_IMAGES,
        expected_time_s=expected_per_image,
    )


def _wan(fmt: OutputFormat, quality: Quality, enhanced: bool, expected: float) -> JobTypeSpec:
    steps, guidance = (25, 6.5) if quality is Quality.FAST else (50, 7.5)
    name = f"{fmt.value}_{quality.value}"
    if enhanced:
        name = f"{fmt.value}7b_{quality.value}_enhanced"
    return JobTypeSpec(
        job_type=name,
        model=ModelFamily.WAN,
        format=fmt,
        quality=quality,
        enhanced=enhanced,
        steps=steps,
        guidance_scale=guidance,
        width=832,
        height=480,
        num_frames=81 if fmt is OutputFormat.VIDEO else 1,
        allowed_num_images=(1,),
        expected_time_s=expected,
    )


_IMAGE, _VIDEO, _FAST, _HIGH = OutputFormat.IMAGE, OutputFormat.VIDEO, Quality.FAST, Quality.HIGH

# Expected times are the seed's figures on an RTX 6000 Ada (upper ends of its ranges).
JOB_TYPES: dict[str, JobTypeSpec] = {
    spec.job_type: spec
    for spec in (
        _sdxl(_FAST, 15, 6.0, expected_per_image=4),
        _sdxl(_HIGH, 25, 7.5, expected_per_image=8),
        _wan(_IMAGE, _FAST, False, expected=40),
        _wan(_IMAGE, _HIGH, False, expected=100),
        _wan(_VIDEO, _FAST, False, expected=135),
        _wan(_VIDEO, _HIGH, False, expected=240),
        _wan(_IMAGE, _FAST, True, expected=85),
        _wan(_IMAGE, _HIGH, True, expected=240),
        _wan(_VIDEO, _FAST, True, expected=195),
        _wan(_VIDEO, _HIGH, True, expected=240),
    )
}


def nearest_wan_frame_count(requested: int) -> int:
    """WAN needs 4k+1 frames; round to the nearest such count within 1..121.

    Ties go down, so the seed's 83 becomes the default 81.
    """
    k = requested // 4
    return max(1, min(WAN_MAX_FRAMES, 4 * k + 1))


def expected_generation_time(spec: JobTypeSpec, num_images: int) -> float:
    if spec.model is ModelFamily.SDXL:
        return spec.expected_time_s * num_images
    return spec.expected_time_s


class JobType(StrEnum):
    """The ten job types (the keys of ``JOB_TYPES``): a closed set for API clients' types."""

    SDXL_IMAGE_FAST = "sdxl_image_fast"
    SDXL_IMAGE_HIGH = "sdxl_image_high"
    IMAGE_FAST = "image_fast"
    IMAGE_HIGH = "image_high"
    VIDEO_FAST = "video_fast"
    VIDEO_HIGH = "video_high"
    IMAGE7B_FAST_ENHANCED = "image7b_fast_enhanced"
    IMAGE7B_HIGH_ENHANCED = "image7b_high_enhanced"
    VIDEO7B_FAST_ENHANCED = "video7b_fast_enhanced"
    VIDEO7B_HIGH_ENHANCED = "video7b_high_enhanced"


if set(JobType) != set(JOB_TYPES):  # pragma: no cover - a catalog edit that forgot the enum
    raise RuntimeError(f"JobType {sorted(JobType)} differs from JOB_TYPES {sorted(JOB_TYPES)}")
