"""The job's domain vocabulary, shared by the HTTP models, the planner and persistence.

Nothing here does I/O or knows about HTTP, Ray or the database, so every layer may import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from uuid import UUID

from ourvidz_serve.catalog import JobTypeSpec, Tier


class JobStatus(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class AssetKind(StrEnum):
    IMAGE = "image"
    VIDEO = "video"


@dataclass(frozen=True)
class AssetPlan:
    index: int
    seed: int
    bucket: str
    path: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class JobPlan:
    """Everything a submission writes: the job row and its asset rows."""

    job_id: UUID
    user_id: UUID
    spec: JobTypeSpec
    prompt: str
    metadata: dict[str, Any]
    assets: list[AssetPlan]
    batch_key: str
    """Jobs of one queue with equal keys can share one pipeline call."""
    units: int
    """Work in the queue's capacity unit: images for SDXL, jobs for WAN."""
    project_id: UUID | None = None
    video_id: UUID | None = None
    image_id: UUID | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    asset_kind: AssetKind = field(default=AssetKind.IMAGE)
    tier: Tier = Tier.STANDARD
    cost_s: float = 0.0
    """Expected GPU seconds: the catalog's expected time times the job's units."""
    adapters: tuple[str, ...] = ()
    """Content digests of the LoRAs the job applies (claims prefer replicas holding them)."""
