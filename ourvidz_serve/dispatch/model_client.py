"""How the dispatcher reaches the models: an interface, and an in-process implementation.

The Ray Serve deployments implement the same interface through handles
(``ourvidz_serve.deployments.client``); the in-process one runs the same pipeline runners in
worker threads, for tests and tools that do not start Ray.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from ourvidz_serve.pipelines.base import (
    EncodedAsset,
    EnhanceRequest,
    EnhanceResult,
    ImageRequest,
    VideoRequest,
)


class ModelClient(Protocol):
    async def generate_images(self, requests: list[ImageRequest]) -> list[EncodedAsset]: ...

    async def generate_video(self, request: VideoRequest) -> EncodedAsset: ...

    async def enhance(self, requests: list[EnhanceRequest]) -> list[EnhanceResult]: ...

    async def check(self) -> dict[str, str]:
        """Ask every model whether it answers; raise if one does not."""
        ...


class SDXLRunnerLike(Protocol):
    def generate(self, requests: list[ImageRequest]) -> list[EncodedAsset]: ...


class WanRunnerLike(Protocol):
    def generate(self, request: VideoRequest) -> EncodedAsset: ...


class EnhancerRunnerLike(Protocol):
    def enhance(self, requests: list[EnhanceRequest]) -> list[EnhanceResult]: ...


class InProcessModelClient:
    """Runs the pipeline runners in threads, one call per model at a time."""

    def __init__(
        self, sdxl: SDXLRunnerLike, wan: WanRunnerLike, enhancer: EnhancerRunnerLike
    ) -> None:
        self._sdxl, self._wan, self._enhancer = sdxl, wan, enhancer
        self._locks = {name: asyncio.Lock() for name in ("sdxl", "wan", "enhancer")}

    async def generate_images(self, requests: list[ImageRequest]) -> list[EncodedAsset]:
        async with self._locks["sdxl"]:
            return await asyncio.to_thread(self._sdxl.generate, requests)

    async def generate_video(self, request: VideoRequest) -> EncodedAsset:
        async with self._locks["wan"]:
            return await asyncio.to_thread(self._wan.generate, request)

    async def enhance(self, requests: list[EnhanceRequest]) -> list[EnhanceResult]:
        async with self._locks["enhancer"]:
            return await asyncio.to_thread(self._enhancer.enhance, requests)

    async def check(self) -> dict[str, str]:
        return {"sdxl": "ok", "wan": "ok", "enhancer": "ok"}
