"""Model deployments. Each wraps one pipeline runner; the runners know nothing of Ray.

Pipeline calls run in a worker thread so that the replica's event loop keeps answering
health checks and queueing requests while a model is busy.
"""

from __future__ import annotations

import asyncio

from ray import serve

from ourvidz_serve.pipelines.base import (
    EncodedAsset,
    EnhanceRequest,
    EnhanceResult,
    ImageRequest,
    VideoRequest,
)
from ourvidz_serve.settings import Settings


@serve.deployment(name="SDXL")
class SDXLDeployment:
    """SDXL text-to-image and image-to-image; images from concurrent jobs share a call."""

    def __init__(self, settings: Settings) -> None:
        from ourvidz_serve.pipelines.sdxl import SDXLPipelineRunner

        self._runner = SDXLPipelineRunner.build(settings)

    @serve.batch(max_batch_size=6, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, requests: list[ImageRequest]) -> list[EncodedAsset]:
        return await asyncio.to_thread(self._runner.generate, requests)

    async def generate_images(self, requests: list[ImageRequest]) -> list[EncodedAsset]:
        """All images of one job; the runner keeps the seed rule whatever the batch.

        The job's requests are validated before they join a batch, so that one job's bad
        input (an undecodable reference, say) fails that job alone, not its batch-mates.
        """
        await asyncio.to_thread(self._runner.validate, requests)
        return list(await asyncio.gather(*(self._generate_batch(r) for r in requests)))

    def ready(self) -> str:
        return "ok"


@serve.deployment(name="WAN")
class WanDeployment:
    """WAN 2.1 text-to-video and text-to-image, one generation at a time."""

    def __init__(self, settings: Settings) -> None:
        from ourvidz_serve.pipelines.wan import WanPipelineRunner

        self._runner = WanPipelineRunner.build(settings)
        self._lock = asyncio.Lock()

    async def generate_video(self, request: VideoRequest) -> EncodedAsset:
        async with self._lock:
            return await asyncio.to_thread(self._runner.generate, request)

    def ready(self) -> str:
        return "ok"


@serve.deployment(name="Enhancer")
class EnhancerDeployment:
    """Qwen2.5 prompt enhancement; concurrent prompts share one ``generate`` call."""

    def __init__(self, settings: Settings) -> None:
        from ourvidz_serve.pipelines.qwen import QwenEnhancerRunner

        self._runner = QwenEnhancerRunner.build(settings)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _enhance_batch(self, requests: list[EnhanceRequest]) -> list[EnhanceResult]:
        return await asyncio.to_thread(self._runner.enhance, requests)

    async def enhance(self, requests: list[EnhanceRequest]) -> list[EnhanceResult]:
        return list(await asyncio.gather(*(self._enhance_batch(r) for r in requests)))

    def ready(self) -> str:
        return "ok"
