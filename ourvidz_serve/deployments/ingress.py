"""The ingress deployment: the FastAPI app (validate, persist, read) inside a Serve replica."""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from ourvidz_serve.api.app import create_app
from ourvidz_serve.deployments.client import RayModelClient
from ourvidz_serve.deployments.metrics import RayClusterFeed, ray_metrics_recorder
from ourvidz_serve.deployments.models import alive_nodes
from ourvidz_serve.settings import Settings


@serve.deployment(name="Ingress")
@serve.ingress()
class IngressDeployment:
    def __init__(
        self,
        settings: Settings,
        sdxl: DeploymentHandle,
        wan: DeploymentHandle,
        enhancer: DeploymentHandle,
    ) -> None:
        settings.check_cluster_size(alive_nodes())
        self._app = create_app(
            settings,
            RayModelClient(sdxl, wan, enhancer),
            ray_metrics_recorder(),
            RayClusterFeed(),
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app

    async def check_health(self) -> None:
        """Serve's health check: the ingress's loops (reaper, callbacks, job events) and the
        database answering in time."""
        state = getattr(self._app.state, "ourvidz", None)
        if state is None:  # the app's lifespan has not opened its state yet
            return
        await state.health.check(state.supervisor.problems())
