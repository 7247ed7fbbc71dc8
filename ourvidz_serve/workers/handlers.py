"""From claimed jobs to pipeline calls: the model-specific half of a worker.

A handler turns a claimed batch into runner calls and returns one result per job: the encoded
outputs, or the exception that failed that job alone. Runners are synchronous and run in a
worker thread, so the replica's event loop keeps renewing leases while a model is busy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable
from uuid import UUID

from ourvidz_serve.catalog import (
    JOB_TYPES,
    JobTypeSpec,
    ModelFamily,
    OutputFormat,
    ReferenceType,
    StepCache,
)
from ourvidz_serve.observability.metrics import NO_METRICS, Metrics
from ourvidz_serve.persistence.repository import JobRecord
from ourvidz_serve.pipelines.base import (
    EncodedAsset,
    Enhancer,
    EnhanceRequest,
    EnhanceResult,
    EnhanceTarget,
    ImageRequest,
    LoraWeight,
    StepCallback,
    VideoRequest,
)
from ourvidz_serve.security.prompt_policy import PromptPolicy
from ourvidz_serve.storage import LORAS_BUCKET, REFERENCE_IMAGES_BUCKET, Storage, lora_key

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generated:
    """One job's outputs, in asset order, and what running it taught us."""

    outputs: list[EncodedAsset]
    prompt: str
    generation_time: float
    """Seconds of model time of the pipeline call that produced these outputs."""
    metadata: dict[str, Any] = field(default_factory=dict)


JobResult = Generated | Exception


class JobCancelled(Exception):
    """A job was cancelled while it ran; its outputs, if any, are not stored."""

    def __init__(self, message: str, step: int | None = None, total: int | None = None) -> None:
        super().__init__(message)
        self.step = step
        """The denoising step its call stopped at (None: it never started or ran to the end)."""
        self.total = total


@dataclass(frozen=True)
class RunControl:
    """What a running call asks its worker. Both callables are safe to call from the
    pipeline's thread, at every denoising step."""

    is_cancelled: Callable[[UUID, int], bool]
    """``(job id, attempt)``: a cancel mark is the attempt's, never a later re-run's."""
    report_progress: Callable[[UUID, int, int, int], None]
    """``(job id, attempt, step, total)``."""

    def step_callback(self, jobs: Sequence[JobRecord]) -> StepCallback:
        """Report each step for every job of a call; stop the call once all are cancelled.

        A call shared by several jobs runs on while one of them is still wanted: the
        cancelled ones' outputs are dropped afterwards, the others' pixels are untouched.
        """
        held = [(job.id, job.attempts) for job in jobs]

        def on_step(step: int, total: int) -> None:
            for job_id, attempt in held:
                self.report_progress(job_id, attempt, step, total)
            if all(self.is_cancelled(job_id, attempt) for job_id, attempt in held):
                raise JobCancelled(f"cancelled at denoising step {step} of {total}", step, total)

        return on_step


NO_CONTROL = RunControl(is_cancelled=lambda *_: False, report_progress=lambda *_: None)


class JobHandler(Protocol):
    async def run(
        self, jobs: Sequence[JobRecord], control: RunControl = NO_CONTROL
    ) -> list[JobResult]:
        """One result per job, in order; raises nothing for a job's own failure."""
        ...


@dataclass(frozen=True)
class HeldAdapters:
    active: list[str]
    """Content digests of the LoRAs in the pipeline now: a job with these loads nothing."""
    cached: list[str]
    """Content digests of the LoRAs parsed in CPU memory: a job with these downloads nothing."""


@runtime_checkable
class AdapterHolder(Protocol):
    """A handler whose runner keeps LoRAs: claims may prefer jobs whose LoRAs it holds."""

    def held_adapters(self) -> HeldAdapters: ...


class SDXLRunnerLike(Protocol):
    def validate(self, requests: Sequence[ImageRequest]) -> None: ...

    def add_lora(self, digest: str, data: bytes) -> None: ...

    def resident_loras(self) -> list[str]: ...

    def active_loras(self) -> list[str]: ...

    def generate(
        self, requests: Sequence[ImageRequest], on_step: StepCallback | None = None
    ) -> list[EncodedAsset]: ...


class WanRunnerLike(Protocol):
    def generate(
        self, request: VideoRequest, on_step: StepCallback | None = None
    ) -> EncodedAsset: ...


@runtime_checkable
class WanRunnerWithStats(WanRunnerLike, Protocol):
    """A runner that also says what a call's step cache did (``WanPipelineRunner``)."""

    def generate_with_stats(
        self, request: VideoRequest, on_step: StepCallback | None = None
    ) -> tuple[EncodedAsset, dict[str, Any]]: ...


NO_STEP_CACHES: Mapping[str, StepCache] = MappingProxyType({})


def enhance_target(spec: JobTypeSpec) -> EnhanceTarget:
    if spec.model is ModelFamily.SDXL:
        return EnhanceTarget.SDXL
    return EnhanceTarget.WAN_VIDEO if spec.format is OutputFormat.VIDEO else EnhanceTarget.WAN_IMAGE


class SDXLJobHandler:
    """Every image of a claimed batch in one pipeline call.

    Each job is validated on its own first, so one job's bad input (an undecodable reference)
    fails that job alone and its batch-mates still run.
    """

    def __init__(
        self, runner: SDXLRunnerLike, storage: Storage, metrics: Metrics = NO_METRICS
    ) -> None:
        self._runner = runner
        self._storage = storage
        self._metrics = metrics
        self._lora_names: dict[str, str] = {}

    async def run(
        self, jobs: Sequence[JobRecord], control: RunControl = NO_CONTROL
    ) -> list[JobResult]:
        results: list[JobResult | None] = [None] * len(jobs)
        runnable: dict[int, list[ImageRequest]] = {}
        for position, job in enumerate(jobs):
            if control.is_cancelled(job.id, job.attempts):
                results[position] = JobCancelled("cancelled before its call started")
                continue
            try:
                requests = await self._requests(job)
                await self._hold_loras(requests)
                await asyncio.to_thread(self._runner.validate, requests)
            except Exception as exc:  # noqa: BLE001 - the exception is this job's outcome
                results[position] = exc
            else:
                runnable[position] = requests
        if runnable:
            flat = [request for requests in runnable.values() for request in requests]
            on_step = control.step_callback([jobs[position] for position in runnable])
            started = time.monotonic()
            try:
                outputs = await asyncio.to_thread(self._runner.generate, flat, on_step)
                self._metrics.pipeline_call("sdxl", len(flat))
            except Exception as exc:  # noqa: BLE001 - a failed call fails each of its jobs
                for position in runnable:
                    results[position] = exc
            else:
                elapsed = time.monotonic() - started
                offset = 0
                for position, requests in runnable.items():
                    results[position] = Generated(
                        outputs=outputs[offset : offset + len(requests)],
                        prompt=jobs[position].prompt,
                        generation_time=elapsed,
                        metadata={"pipeline_batch_images": len(flat)},
                    )
                    if control.is_cancelled(jobs[position].id, jobs[position].attempts):
                        results[position] = JobCancelled("cancelled while its call ran")
                    offset += len(requests)
        return [result for result in results if result is not None]

    def held_adapters(self) -> HeldAdapters:
        return HeldAdapters(self._runner.active_loras(), self._runner.resident_loras())

    def resident_loras(self) -> list[dict[str, str | None]]:
        """The LoRAs the runner holds, least recently used first, with the registry names
        jobs gave them (None for one held before this handler saw its name)."""
        return [
            {"digest": digest, "name": self._lora_names.get(digest)}
            for digest in self._runner.resident_loras()
        ]

    async def _hold_loras(self, requests: Sequence[ImageRequest]) -> None:
        """Fetch and hand the runner the LoRAs it does not hold yet (batch-mates share theirs,
        so a claimed batch loads each at most once)."""
        needed = dict.fromkeys(lora.digest for request in requests for lora in request.loras)
        if not needed:
            return
        held = set(self._runner.resident_loras())
        for digest in needed:
            if digest not in held:
                data = await self._storage.get(LORAS_BUCKET, lora_key(digest))
                # Parsing (and, on a GPU, pinning) is CPU work: off the event loop.
                await asyncio.to_thread(self._runner.add_lora, digest, data)

    async def _requests(self, job: JobRecord) -> list[ImageRequest]:
        meta = job.metadata
        reference = None
        if meta.get("reference_image_key"):
            reference = await self._storage.get(
                REFERENCE_IMAGES_BUCKET, meta["reference_image_key"]
            )
        loras = tuple(
            LoraWeight(digest=str(lora["digest"]), scale=float(lora["scale"]))
            for lora in meta.get("loras", [])
        )
        self._lora_names.update((lora["digest"], lora["name"]) for lora in meta.get("loras", []))
        return [
            ImageRequest(
                prompt=job.prompt,
                negative_prompt=meta.get("negative_prompt"),
                seed=int(asset.metadata["seed"]),
                steps=int(meta["steps"]),
                guidance_scale=float(meta["guidance_scale"]),
                width=int(meta["width"]),
                height=int(meta["height"]),
                reference_image=reference,
                reference_strength=float(meta.get("reference_strength", 0.7)),
                reference_type=ReferenceType(meta.get("reference_type", ReferenceType.STYLE)),
                loras=loras,
            )
            for asset in job.assets
        ]


class WanJobHandler:
    """One WAN output per job; enhanced job types get their prompt from the enhancer first.

    ``step_caches`` (job type -> diffusers step cache, ``Settings.wan_step_cache``) turns a
    cache on for that type's jobs. A cached job's metadata records ``"step_cache"`` (the cache's
    name) and, from runners that report them, ``step_cache_computed_calls`` /
    ``step_cache_skipped_calls`` (transformer forward calls whose blocks ran / were skipped) and
    ``step_cache_calibration`` (the call that calibrated MagCache, skipping nothing). Jobs run
    without a cache have none of these keys.
    """

    def __init__(
        self,
        runner: WanRunnerLike,
        enhancer: Enhancer,
        policy: PromptPolicy | None = None,
        step_caches: Mapping[str, StepCache] = NO_STEP_CACHES,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self._runner = runner
        self._enhancer = enhancer
        self._policy = policy
        self._step_caches = dict(step_caches)
        self._metrics = metrics

    async def run(
        self, jobs: Sequence[JobRecord], control: RunControl = NO_CONTROL
    ) -> list[JobResult]:
        results: list[JobResult] = []
        for job in jobs:
            try:
                results.append(await self._run_one(job, control))
            except Exception as exc:  # noqa: BLE001 - the exception is this job's outcome
                results.append(exc)
        return results

    async def _run_one(self, job: JobRecord, control: RunControl) -> Generated:
        spec = JOB_TYPES[job.job_type]
        meta = job.metadata
        prompt = job.prompt
        metadata: dict[str, Any] = {}
        if spec.enhanced:
            metadata = await self._enhance(prompt, spec)
            prompt = metadata["enhanced_prompt"]
            if self._policy is not None:
                # The enhancer writes new text: it passes the same policy as the user's
                # prompt did, before any generation time is spent on it.
                await self._policy.check(prompt, field="enhanced_prompt")
        request = VideoRequest(
            prompt=prompt,
            negative_prompt=None,
            seed=int(job.assets[0].metadata["seed"]),
            steps=int(meta["sample_steps"]),
            guidance_scale=float(meta["sample_guide_scale"]),
            width=int(meta["width"]),
            height=int(meta["height"]),
            num_frames=int(meta["frame_num"]),
            fps=int(meta.get("fps", 16)),
            step_cache=self._step_caches.get(job.job_type),
        )
        if control.is_cancelled(job.id, job.attempts):
            raise JobCancelled("cancelled before generation started")
        started = time.monotonic()
        output, stats = await asyncio.to_thread(
            self._generate, request, control.step_callback([job])
        )
        self._metrics.pipeline_call("wan", 1)
        if request.step_cache is not None:
            metadata |= {"step_cache": request.step_cache.value, **stats}
        return Generated([output], prompt, time.monotonic() - started, metadata)

    def _generate(
        self, request: VideoRequest, on_step: StepCallback
    ) -> tuple[EncodedAsset, dict[str, Any]]:
        if isinstance(self._runner, WanRunnerWithStats):
            return self._runner.generate_with_stats(request, on_step)
        return self._runner.generate(request, on_step), {}

    async def _enhance(self, prompt: str, spec: JobTypeSpec) -> dict[str, Any]:
        """The enhancement's metadata; the original prompt when the enhancer cannot answer.

        Enhancement improves a prompt but is not what the user paid for, so an enhancer that
        is down does not fail the video: the job runs on its own prompt and records why.
        """
        started = time.monotonic()
        try:
            [enhancement] = await self._enhancer.enhance(
                [EnhanceRequest(prompt, enhance_target(spec))]
            )
        except Exception as exc:  # noqa: BLE001 - recorded on the job and logged
            logger.warning("enhancer failed (%r); using the original prompt", exc)
            enhancement = EnhanceResult(
                prompt, used_fallback=True, warning=f"enhancer unavailable: {exc!r}"[:500]
            )
        metadata: dict[str, Any] = {
            "original_prompt": prompt,
            "enhanced_prompt": enhancement.enhanced_prompt,
            "enhancement_fallback": enhancement.used_fallback,
            "enhancement_time": round(time.monotonic() - started, 4),
        }
        if enhancement.warning:
            metadata["enhancement_warning"] = enhancement.warning
        return metadata
