"""The dispatcher's ModelClient over Ray Serve deployment handles."""

from __future__ import annotations

import asyncio
from typing import Any

from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from ourvidz_serve.pipelines.base import (
    EncodedAsset,
    EnhanceRequest,
    EnhanceResult,
    ImageRequest,
    VideoRequest,
)


class RayModelClient:
    def __init__(
        self, sdxl: DeploymentHandle, wan: DeploymentHandle, enhancer: DeploymentHandle
    ) -> None:
        self._sdxl, self._wan, self._enhancer = sdxl, wan, enhancer

    async def generate_images(self, requests: list[ImageRequest]) -> list[EncodedAsset]:
        result: list[EncodedAsset] = await _unwrapped(self._sdxl.generate_images.remote(requests))
        return result

    async def generate_video(self, request: VideoRequest) -> EncodedAsset:
        result: EncodedAsset = await _unwrapped(self._wan.generate_video.remote(request))
        return result

    async def enhance(self, requests: list[EnhanceRequest]) -> list[EnhanceResult]:
        result: list[EnhanceResult] = await _unwrapped(self._enhancer.enhance.remote(requests))
        return result

    async def check(self) -> dict[str, str]:
        names = ("sdxl", "wan", "enhancer")
        handles = (self._sdxl, self._wan, self._enhancer)
        answers = await asyncio.gather(*(_unwrapped(h.ready.remote()) for h in handles))
        return dict(zip(names, answers, strict=True))


async def _unwrapped(response: Any) -> Any:
    """Await a handle call; re-raise a deployment's own exception rather than Ray's wrapper."""
    try:
        return await response
    except RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, Exception):
            raise cause from exc
        raise
