"""The executor over real PostgreSQL and local storage, with models that never answer."""

import asyncio
from pathlib import Path
from uuid import UUID

from ourvidz_serve.dispatch.executor import JobExecutor
from ourvidz_serve.jobs.planning import plan_job
from ourvidz_serve.jobs.protocol import JobRequest, JobStatus
from ourvidz_serve.pipelines.base import (
    EncodedAsset,
    EnhanceRequest,
    EnhanceResult,
    ImageRequest,
    VideoRequest,
)
from ourvidz_serve.storage.local import LocalStorage

USER = UUID("6f1c1f38-5b8e-4a52-8f8e-0c9a6f0d2b11")


class ModelsThatNeverAnswer:
    """Stands in for a model replica stuck in a long generation."""

    def __init__(self) -> None:
        self.called = asyncio.Event()

    async def _hang(self) -> None:
        self.called.set()
        await asyncio.Event().wait()

    async def generate_images(self, requests: list[ImageRequest]) -> list[EncodedAsset]:
        await self._hang()
        raise AssertionError("unreachable")

    async def generate_video(self, request: VideoRequest) -> EncodedAsset:
        await self._hang()
        raise AssertionError("unreachable")

    async def enhance(self, requests: list[EnhanceRequest]) -> list[EnhanceResult]:
        await self._hang()
        raise AssertionError("unreachable")

    async def check(self) -> dict[str, str]:
        return {}


async def test_a_job_interrupted_by_shutdown_goes_back_to_the_queue(repository, tmp_path: Path):
    storage = LocalStorage(tmp_path, "http://127.0.0.1:8000", b"k" * 32, 60)
    await storage.start()
    models = ModelsThatNeverAnswer()
    executor = JobExecutor(repository, storage, models)
    request = JobRequest.model_validate({"job_type": "video_fast", "prompt": "rain on a lake"})
    job, _ = await repository.insert_job(plan_job(request, USER))
    [claimed] = await repository.claim_jobs("wan_queue", 1)

    task = asyncio.create_task(executor.run(claimed))
    await asyncio.wait_for(models.called.wait(), timeout=5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    requeued = await repository.get_job(job.id)
    assert requeued is not None and requeued.status is JobStatus.QUEUED
    assert {asset.status for asset in requeued.assets} == {JobStatus.QUEUED}
    assert requeued.error_message is None
