"""The models as the ingress and the WAN worker see them, over Ray Serve handles."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from ourvidz_serve.catalog import Queue
from ourvidz_serve.pipelines.base import EnhanceRequest, EnhanceResult

REPLICAS_CACHE_S = 5.0


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
        self._replicas: tuple[float, dict[str, int]] | None = None

    async def check(self) -> dict[str, Any]:
        answers = await asyncio.gather(
            *(_unwrapped(handle.ready.remote()) for handle in self._handles.values())
        )
        return dict(zip(self._handles, answers, strict=True))

    async def replicas(self) -> dict[str, int]:
        """Running replicas per queue, from Serve's controller; cached for a few seconds,
        since a job's estimated start asks on every GET."""
        now = time.monotonic()
        if self._replicas is None or now - self._replicas[0] > REPLICAS_CACHE_S:
            # serve.status() waits on the controller: not on the event loop.
            self._replicas = (now, await asyncio.to_thread(self._running_replicas))
        return dict(self._replicas[1])

    def _running_replicas(self) -> dict[str, int]:
        status = serve.status()
        counts: dict[str, int] = {}
        for queue, handle in (
            (Queue.SDXL, self._handles["sdxl"]),
            (Queue.WAN, self._handles["wan"]),
        ):
            # By deployment name in whichever application holds it (a bound handle's
            # application name may not be the one Serve reports).
            running = 0
            for app in status.applications.values():
                deployment = app.deployments.get(handle.deployment_name)
                if deployment is not None:
                    running += sum(
                        count
                        for state, count in deployment.replica_states.items()
                        if str(getattr(state, "value", state)) == "RUNNING"
                    )
            counts[queue.value] = running
        return counts


async def _unwrapped(response: Any) -> Any:
    """Await a handle call; re-raise a deployment's own exception rather than Ray's wrapper."""
    try:
        return await response
    except RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, Exception):
            raise cause from exc
        raise
