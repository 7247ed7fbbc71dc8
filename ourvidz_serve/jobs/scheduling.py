"""Sharing the GPUs between users: tier weights in fair order and GPU-time quotas."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from uuid import UUID

from ourvidz_serve.catalog import Queue, Tier
from ourvidz_serve.domain import JobStatus
from ourvidz_serve.errors import Forbidden
from ourvidz_serve.jobs.principal import Principal
from ourvidz_serve.jobs.protocol import QueueList, QueueStatus, TierQueueStatus, UsageResource
from ourvidz_serve.persistence.repository import GpuQuota, GpuUsage, JobRecord, JobRepository
from ourvidz_serve.settings import Settings

logger = logging.getLogger(__name__)

TIER_RANK = {Tier.BULK: 0, Tier.STANDARD: 1, Tier.PREMIUM: 2}


@dataclass(frozen=True)
class SchedulingPolicy:
    """Each tier's weight in fair order and its optional GPU-time budget per window."""

    weights: Mapping[Tier, float] = field(
        default_factory=lambda: {Tier.PREMIUM: 4.0, Tier.STANDARD: 2.0, Tier.BULK: 1.0}
    )
    budgets_s: Mapping[Tier, float] = field(default_factory=dict)
    window_s: float = 86400.0

    @classmethod
    def from_settings(cls, settings: Settings) -> SchedulingPolicy:
        return cls(
            weights=dict(settings.tier_weights),
            budgets_s=dict(settings.quota_gpu_seconds),
            window_s=settings.quota_window_s,
        )

    def weight(self, tier: Tier) -> float:
        return self.weights.get(tier, 1.0)

    def quota(self, tier: Tier) -> GpuQuota | None:
        """The tier's budget; ``None`` when the tier has no quota."""
        budget = self.budgets_s.get(tier)
        return None if budget is None else GpuQuota(budget_s=budget, window_s=self.window_s)


def tier_of(principal: Principal, requested: Tier | None) -> Tier:
    """The tier a request runs in: a service key names any; a user's token sets theirs (its
    ``tier`` claim, else standard), and a body may lower it but never raise it."""
    if principal.is_service:
        return requested or Tier.STANDARD
    own = principal.tier or Tier.STANDARD
    if requested is None:
        return own
    if TIER_RANK[requested] > TIER_RANK[own]:
        raise Forbidden(
            f"tier {requested.value!r} is above this user's tier {own.value!r} "
            "(a user's tier comes from their token)",
            details={"tier": own.value},
        )
    return requested


class UsageService:
    def __init__(self, repository: JobRepository, policy: SchedulingPolicy) -> None:
        self._repository = repository
        self._policy = policy

    async def usage(
        self, principal: Principal, user_id: UUID | None, tier: Tier | None
    ) -> UsageResource:
        """A user's GPU time in the window: their own (a token), any user's (a service key,
        which names the user and, optionally, the tier whose quota applies)."""
        user = principal.acting_for(user_id)
        tier = tier_of(principal, tier)
        quota = self._policy.quota(tier)
        usage: GpuUsage = await self._repository.gpu_usage(
            user, quota or GpuQuota(budget_s=float("inf"), window_s=self._policy.window_s)
        )
        return UsageResource(
            user_id=user,
            tier=tier,
            window_s=usage.window_s,
            spent_gpu_seconds=round(usage.spent_s, 3),
            reserved_gpu_seconds=round(usage.reserved_s, 3),
            budget_gpu_seconds=None if quota is None else quota.budget_s,
            remaining_gpu_seconds=None if quota is None else round(usage.remaining_s, 3),
        )


ReplicaCounts = Callable[[], Awaitable[dict[str, int]]]
"""Running replicas of each queue's deployment, by queue name."""

OVERVIEW_CAP = 100_000
"""Queued jobs counted per queue: beyond it the overview's figures are lower bounds."""
POSITION_CAP = 10_000
"""Jobs ahead counted for a job's position: beyond it the position reads as the cap."""


class QueueService:
    """What the queues hold, per tier, and where a queued job stands in fair order."""

    def __init__(self, repository: JobRepository, replicas: ReplicaCounts) -> None:
        self._repository = repository
        self._replicas = replicas

    async def _replica_counts(self) -> dict[str, int] | None:
        """Per queue, the larger of Serve's running replicas and the replicas holding a
        lease: a replica pulls work from the end of its constructor, while Serve may still
        report it starting (and its count is cached for a few seconds)."""
        try:
            serving, working = await asyncio.gather(
                self._replicas(), self._repository.replicas_at_work([q.value for q in Queue])
            )
        except Exception:
            logger.warning("replica counts unavailable", exc_info=True)
            return None
        return {
            queue.value: max(serving.get(queue.value, 0), working.get(queue.value, 0))
            for queue in Queue
        }

    async def overview(self, principal: Principal) -> QueueList:
        if not principal.is_service:
            raise Forbidden("the queues are shown to service keys only")
        figures, replicas = await asyncio.gather(
            self._repository.queue_overview([queue.value for queue in Queue], OVERVIEW_CAP),
            self._replica_counts(),
        )
        queues = []
        for queue in Queue:
            tiers = [
                TierQueueStatus(
                    tier=row.tier,
                    queued=row.queued,
                    running=row.running,
                    oldest_wait_s=_rounded(row.oldest_wait_s),
                    backlog_gpu_seconds=round(row.backlog_s, 3),
                )
                for row in figures
                if row.queue == queue.value
            ]
            waits = [tier.oldest_wait_s for tier in tiers if tier.oldest_wait_s is not None]
            queues.append(
                QueueStatus(
                    queue=queue,
                    replicas=None if replicas is None else replicas.get(queue.value, 0),
                    queued=sum(tier.queued for tier in tiers),
                    running=sum(tier.running for tier in tiers),
                    oldest_wait_s=max(waits) if waits else None,
                    backlog_gpu_seconds=round(sum(t.backlog_gpu_seconds for t in tiers), 3),
                    tiers=tiers,
                )
            )
        return QueueList(queues=queues)

    async def estimate(self, job: JobRecord) -> tuple[int, datetime] | None:
        """A queued job's ``(jobs ahead in fair order, estimated start)``: the expected GPU
        time ahead of it spread over the queue's running replicas (at least one)."""
        if job.status is not JobStatus.QUEUED:
            return None
        (ahead, ahead_s), replicas = await asyncio.gather(
            self._repository.queue_position(job, POSITION_CAP), self._replica_counts()
        )
        count = max((replicas or {}).get(job.queue, 1), 1)
        return ahead, datetime.now(UTC) + timedelta(seconds=ahead_s / count)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
