"""What the ingress needs from the model deployments: readiness, and instant enhancement.

Jobs never go through here: model replicas claim them from PostgreSQL themselves. The Ray
Serve implementation is ``ourvidz_serve.deployments.client.RayModelClient``.
"""

from __future__ import annotations

from typing import Protocol

from ourvidz_serve.pipelines.base import EnhanceRequest, EnhanceResult


class ModelClient(Protocol):
    async def enhance(self, requests: list[EnhanceRequest]) -> list[EnhanceResult]: ...

    async def check(self) -> dict[str, str]:
        """Ask every model deployment whether it answers; raise if one does not."""
        ...
