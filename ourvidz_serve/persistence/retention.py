"""What the retention and user-deletion statements of the repository return."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from uuid import UUID

from ourvidz_serve.domain import JobStatus


@dataclass(frozen=True)
class FinishedJobFiles:
    """A finished job and the storage keys its asset rows name."""

    id: UUID
    user_id: UUID
    job_type: str
    status: JobStatus
    bucket: str | None
    """The bucket its asset rows name (None: no asset row; the job type's bucket then)."""
    recorded: frozenset[str]
    """The files the winning completion recorded (and posters): what downloads serve."""
    named: frozenset[str]
    """Every key the rows name: ``recorded`` plus planned and attempt keys and posters."""

    @property
    def prefix(self) -> str:
        """Every file of the job, whichever attempt stored it, has a key starting with this."""
        return f"{self.user_id}/{self.id}"


@dataclass(frozen=True)
class CancelledJob:
    id: UUID
    job_type: str
    was: JobStatus
    """``queued`` or ``processing`` (its worker was told, and its outcome is fenced out)."""


@dataclass(frozen=True)
class DeletedUserRows:
    """How many rows of a user went, table by table (asset and callback rows went with the
    jobs, by cascade)."""

    jobs: int
    fair_shares: int
    gpu_usage: int
    rate_limits: int


PurgeFiles = Callable[[list[FinishedJobFiles]], Awaitable[Collection[UUID]]]
"""Deletes the files of a batch of jobs; returns the ids whose files are all gone."""
