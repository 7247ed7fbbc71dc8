"""What the ingress needs from the model deployments: readiness, and instant enhancement.

Jobs never go through here: model replicas claim them from PostgreSQL themselves. The Ray
Serve implementation is ``ourvidz_serve.deployments.client.RayModelClient``.
"""

from __future__ import annotations

from typing import Any, Protocol

from ourvidz_serve.pipelines.base import Enhancer


class ModelClient(Enhancer, Protocol):
    async def check(self) -> dict[str, Any]:
        """Every model deployment's readiness answer (placement, GPU memory); raise if one
        does not answer."""
        ...

    async def replicas(self) -> dict[str, int]:
        """Running replicas of each queue's deployment, by queue name (``sdxl_queue``...)."""
        ...
