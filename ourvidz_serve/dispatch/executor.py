"""Running one claimed job: enhance, generate, store, and record the outcome."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

from ourvidz_serve.catalog import JOB_TYPES, JobTypeSpec, ModelFamily, OutputFormat
from ourvidz_serve.dispatch.model_client import ModelClient
from ourvidz_serve.errors import OurVidzError
from ourvidz_serve.persistence.repository import AssetCompletion, JobRecord, JobRepository
from ourvidz_serve.pipelines.base import (
    EncodedAsset,
    EnhanceRequest,
    EnhanceTarget,
    ImageRequest,
    VideoRequest,
)
from ourvidz_serve.storage import REFERENCE_IMAGES_BUCKET, Storage

logger = logging.getLogger(__name__)


def enhance_target(spec: JobTypeSpec) -> EnhanceTarget:
    if spec.model is ModelFamily.SDXL:
        return EnhanceTarget.SDXL
    return EnhanceTarget.WAN_VIDEO if spec.format is OutputFormat.VIDEO else EnhanceTarget.WAN_IMAGE


class JobExecutor:
    def __init__(self, repository: JobRepository, storage: Storage, models: ModelClient) -> None:
        self._repository = repository
        self._storage = storage
        self._models = models

    async def run(self, job: JobRecord) -> None:
        """Run a claimed job to a terminal state; never raises for a job's own failure.

        A job cancelled here (the dispatcher is stopping) goes back to the queue for another
        replica, instead of staying ``processing``.
        """
        started = time.monotonic()
        metadata: dict[str, Any] = {}
        try:
            await self._run(job, started, metadata)
        except asyncio.CancelledError:
            logger.warning("job %s interrupted by shutdown; returning it to the queue", job.id)
            await asyncio.shield(self._repository.requeue_job(job.id))
            raise
        except Exception as exc:
            logger.exception("job %s (%s) failed", job.id, job.job_type)
            message = exc.message if isinstance(exc, OurVidzError) else str(exc)
            metadata["total_time"] = round(time.monotonic() - started, 4)
            await self._repository.fail_job(
                job.id, message or type(exc).__name__, type(exc).__name__, metadata
            )

    async def _run(self, job: JobRecord, started: float, metadata: dict[str, Any]) -> None:
        """Generate, store and complete; ``metadata`` collects what is known so far."""
        spec = JOB_TYPES[job.job_type]
        prompt = job.prompt
        if job.started_at is not None:
            metadata["queue_wait_time"] = round(
                (job.started_at - job.created_at).total_seconds(), 4
            )
        if spec.enhanced:
            enhancement = (
                await self._models.enhance([EnhanceRequest(prompt, enhance_target(spec))])
            )[0]
            metadata |= {
                "original_prompt": prompt,
                "enhanced_prompt": enhancement.enhanced_prompt,
                "enhancement_fallback": enhancement.used_fallback,
            }
            if enhancement.warning:
                metadata["enhancement_warning"] = enhancement.warning
            prompt = enhancement.enhanced_prompt
            await self._repository.merge_job_metadata(job.id, metadata)

        generation_started = time.monotonic()
        outputs = await self._generate(job, spec, prompt)
        generation_time = time.monotonic() - generation_started
        if len(outputs) != len(job.assets):
            raise RuntimeError(
                f"model returned {len(outputs)} outputs for {len(job.assets)} assets"
            )

        await asyncio.gather(
            *(
                self._storage.put(asset.bucket, asset.path, output.data, output.mime_type)
                for asset, output in zip(job.assets, outputs, strict=True)
            )
        )
        finished_at = datetime.now(UTC).isoformat()
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
                    "generation_time": round(generation_time, 4),
                    "stored_path": asset.path,
                    "prompt": prompt,
                },
            )
            for asset, output in zip(job.assets, outputs, strict=True)
        ]
        expected = float(job.metadata.get("expected_generation_time") or 0)
        metadata |= {
            "generation_time": round(generation_time, 4),
            "total_time": round(time.monotonic() - started, 4),
            "generation_timestamp": finished_at,
            "output_width": outputs[0].width,
            "output_height": outputs[0].height,
            "batch_count": len(outputs),
        }
        if expected > 0:
            metadata["performance_ratio"] = round(generation_time / expected, 6)
        await self._repository.complete_job(job.id, metadata, completions)

    async def _generate(self, job: JobRecord, spec: JobTypeSpec, prompt: str) -> list[EncodedAsset]:
        meta = job.metadata
        if spec.model is ModelFamily.SDXL:
            reference = None
            if meta.get("reference_image_key"):
                reference = await self._storage.get(
                    REFERENCE_IMAGES_BUCKET, meta["reference_image_key"]
                )
            requests = [
                ImageRequest(
                    prompt=prompt,
                    negative_prompt=meta.get("negative_prompt"),
                    seed=int(asset.metadata["seed"]),
                    steps=int(meta["steps"]),
                    guidance_scale=float(meta["guidance_scale"]),
                    width=int(meta["width"]),
                    height=int(meta["height"]),
                    reference_image=reference,
                    reference_strength=float(meta.get("reference_strength", 0.7)),
                )
                for asset in job.assets
            ]
            return await self._models.generate_images(requests)
        asset = job.assets[0]
        video = VideoRequest(
            prompt=prompt,
            negative_prompt=None,
            seed=int(asset.metadata["seed"]),
            steps=int(meta["sample_steps"]),
            guidance_scale=float(meta["sample_guide_scale"]),
            width=int(meta["width"]),
            height=int(meta["height"]),
            num_frames=int(meta["frame_num"]),
            fps=int(meta.get("fps", 16)),
        )
        return [await self._models.generate_video(video)]
