"""Turning a validated request into the rows a submission writes (no I/O)."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

from ourvidz_serve.catalog import (
    JOB_TYPES,
    WAN_FPS,
    WAN_SAMPLE_SHIFT,
    WAN_SAMPLE_SOLVER,
    JobTypeSpec,
    ModelFamily,
    OutputFormat,
    Tier,
    expected_generation_time,
    nearest_wan_frame_count,
)
from ourvidz_serve.domain import AssetKind, AssetPlan, JobPlan
from ourvidz_serve.jobs.protocol import MAX_SEED, JobRequest
from ourvidz_serve.prompts import generate_negative_prompt_for_sdxl, prompt_stats
from ourvidz_serve.storage import asset_key, poster_key


def asset_seed(job_seed: int, index: int) -> int:
    """The contract's seed rule: image ``i`` of a job with seed ``S`` uses ``S + i`` mod 2^32."""
    return (job_seed + index) % (MAX_SEED + 1)


def request_fingerprint(request: JobRequest, user_id: UUID) -> str:
    """Stable hash of what was asked, to tell a retried submission from a different one."""
    # A fetched reference's key is derived from its URL, so the URL alone says what was asked.
    derived = {"reference_image_key"} if request.reference_image_url is not None else set()
    body = request.model_dump(mode="json", exclude_none=True, exclude=derived)
    body |= {"user_id": str(user_id)}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def plan_job(
    request: JobRequest,
    user_id: UUID,
    *,
    idempotency_key: str | None = None,
    job_id: UUID | None = None,
    now: datetime | None = None,
    tier: Tier = Tier.STANDARD,
    openai_request: dict[str, Any] | None = None,
    lora_digests: Mapping[str, str] | None = None,
) -> JobPlan:
    """The job's rows. ``openai_request``: what an OpenAI-compatible route was asked (its
    ``seconds``, ``size``, ...), recorded in the metadata as it was sent. ``lora_digests``: the
    registry's content digest of each LoRA the request names (checked by the caller)."""
    spec = JOB_TYPES[request.job_type]
    job_id = job_id or uuid4()
    seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
    num_images = request.num_images or 1
    generated_at = (now or datetime.now(UTC)).isoformat()

    system: dict[str, Any] = {
        "prompt": request.prompt,
        "job_type": spec.job_type,
        "model_variant": spec.model_variant,
        "queue": spec.queue.value,
        "bucket": spec.bucket,
        "seed": seed,
        "num_images": num_images,
        "enhanced": spec.enhanced,
        "expected_generation_time": expected_generation_time(spec, num_images),
        "content_type": spec.content_type,
        "file_extension": spec.file_extension,
        "width": spec.width,
        "height": spec.height,
        "submitted_at": generated_at,
        **prompt_stats(request.prompt),
    }
    if spec.model is ModelFamily.SDXL:
        negative = request.negative_prompt
        if negative is None:
            negative = generate_negative_prompt_for_sdxl(request.prompt)
        system |= {
            "negative_prompt": negative,
            "negative_prompt_supported": True,
            "steps": spec.steps,
            "guidance_scale": spec.guidance_scale,
        }
        if request.reference_image_key is not None:
            system |= {
                "reference_image_key": request.reference_image_key,
                "reference_type": request.reference_type.value,
                "reference_strength": request.reference_strength,
            }
            if request.reference_image_url is not None:
                system["reference_image_url"] = request.reference_image_url
        if request.loras:
            # The digest, not the name, is what runs: a name retired and uploaded again
            # later names other weights, and this job keeps the ones it was submitted with.
            digests = lora_digests or {}
            system["loras"] = [
                {"name": lora.name, "scale": lora.scale, "digest": digests[lora.name]}
                for lora in request.loras
            ]
    else:
        frame_num = spec.num_frames
        if spec.format is OutputFormat.VIDEO and request.frame_num is not None:
            frame_num = nearest_wan_frame_count(request.frame_num)
            system["frame_num_requested"] = request.frame_num
        system |= {
            "negative_prompt_supported": False,
            "sample_steps": spec.steps,
            "sample_guide_scale": spec.guidance_scale,
            "sample_solver": WAN_SAMPLE_SOLVER,
            "sample_shift": WAN_SAMPLE_SHIFT,
            "frame_num": frame_num,
        }
        if spec.format is OutputFormat.VIDEO:
            system["fps"] = WAN_FPS

    if openai_request is not None:
        system["openai_request"] = openai_request

    # System keys win over user metadata: the records must stay truthful.
    metadata = {**request.metadata, **system}

    kind = AssetKind.VIDEO if spec.format is OutputFormat.VIDEO else AssetKind.IMAGE
    assets = []
    for index in range(num_images):
        image_seed = asset_seed(seed, index)
        path_index = None if kind is AssetKind.VIDEO else index
        asset_metadata: dict[str, Any] = {
            "model_type": spec.model_type,
            "is_sdxl": spec.model is ModelFamily.SDXL,
            "is_enhanced": spec.enhanced,
            "job_type": spec.job_type,
            "seed": image_seed,
            "bucket": spec.bucket,
        }
        if kind is AssetKind.IMAGE:
            asset_metadata |= {"image_index": index, "total_images": num_images}
        if "negative_prompt" in system:
            asset_metadata["negative_prompt"] = system["negative_prompt"]
        path = asset_key(user_id, job_id, spec.file_extension, path_index)
        asset_metadata["stored_path"] = path
        if kind is AssetKind.VIDEO and spec.format is OutputFormat.VIDEO:
            asset_metadata["thumbnail_path"] = poster_key(path)
        assets.append(
            AssetPlan(
                index=index,
                seed=image_seed,
                bucket=spec.bucket,
                path=path,
                metadata=asset_metadata,
            )
        )

    return JobPlan(
        job_id=job_id,
        user_id=user_id,
        spec=spec,
        prompt=request.prompt,
        metadata=metadata,
        assets=assets,
        project_id=request.project_id,
        video_id=request.video_id,
        image_id=request.image_id,
        idempotency_key=idempotency_key,
        request_hash=request_fingerprint(request, user_id) if idempotency_key else None,
        asset_kind=kind,
        batch_key=batch_key(spec, system),
        adapters=tuple(sorted({lora["digest"] for lora in system.get("loras", [])})),
        units=num_images if spec.model is ModelFamily.SDXL else 1,
        tier=tier,
        cost_s=float(system["expected_generation_time"]),
    )


def batch_key(spec: JobTypeSpec, metadata: dict[str, Any]) -> str:
    """Jobs whose images can share one pipeline call have equal keys.

    SDXL settings follow from the job type, except image-to-image and its strength, and the
    LoRAs with their scales, in order (the runner applies them in that order). WAN runs one
    job per call, so its key is just the job type.
    """
    key = spec.job_type
    if "reference_image_key" in metadata:
        key = f"{key}:reference:{metadata['reference_strength']}"
    if metadata.get("loras"):
        adapters = ",".join(f"{lora['digest']}@{lora['scale']!r}" for lora in metadata["loras"])
        key = f"{key}:loras:{adapters}"
    return key
