"""Request rate limits that hold across ingress replicas (their state is in PostgreSQL)."""

from __future__ import annotations

from uuid import UUID

from ourvidz_serve.errors import RateLimited
from ourvidz_serve.jobs.principal import Principal
from ourvidz_serve.persistence.repository import JobRepository


class RateLimiter:
    """Per-key and per-user request budgets (GCRA: a rate and a burst). A rate of 0 is off."""

    def __init__(
        self,
        repository: JobRepository,
        *,
        per_key_per_s: float,
        per_key_burst: int,
        per_user_per_s: float,
        per_user_burst: int,
    ) -> None:
        self._repository = repository
        self._per_key = (per_key_per_s, per_key_burst)
        self._per_user = (per_user_per_s, per_user_burst)

    async def spend(self, principal: Principal) -> None:
        """One request of the caller's budget: its service key's, or its user's."""
        rate, burst = self._per_key if principal.is_service else self._per_user
        await self._take(principal.rate_subject, rate, burst, "this API key")

    async def spend_for_user(self, user_id: UUID) -> None:
        """One request of a user's budget, spent by a service key acting for them."""
        rate, burst = self._per_user
        await self._take(f"user:{user_id}", rate, burst, "this user")

    async def _take(self, subject: str, rate: float, burst: int, whose: str) -> None:
        if rate <= 0:
            return
        wait = await self._repository.take_rate_token(subject, rate, burst)
        if wait is not None:
            raise RateLimited(
                f"too many requests for {whose}: at most {rate:g}/s with bursts of {burst}",
                retry_after_s=wait,
                details={"retry_after_s": round(wait, 3)},
            )
