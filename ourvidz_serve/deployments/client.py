"""The models as the ingress and the WAN worker see them, over Ray Serve handles."""

from __future__ import annotations

import asyncio
from typing import Any

from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from ourvidz_serve.pipelines.base import EnhanceRequest, EnhanceResult


class RayEnhancer:
    def __init__(self, enhancer: DeploymentHandle) -> None:
        self._enhancer = enhancer

    async def enhance(self, requests: list[EnhanceRequest]) -> list[EnhanceResult]:
        result: list[EnhanceResult] = await _unwrapped(self._enhancer.enhance.remote(requests))
        return result


class RayModelClient(RayEnhancer):
    """Readiness of every model deployment, and enhancement, for the ingress."""

    def __init__(
        self, sdxl: DeploymentHandle, wan: DeploymentHandle, enhancer: DeploymentHandle
    ) -> None:
        super().__init__(enhancer)
        self._handles = {"sdxl": sdxl, "wan": wan, "enhancer": enhancer}

    async def check(self) -> dict[str, Any]:
        answers = await asyncio.gather(
            *(_unwrapped(handle.ready.remote()) for handle in self._handles.values())
        )
        return dict(zip(self._handles, answers, strict=True))


async def _unwrapped(response: Any) -> Any:
    """Await a handle call; re-raise a deployment's own exception rather than Ray's wrapper."""
    try:
        return await response
    except RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, Exception):
            raise cause from exc
        raise
