"""Who is calling."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from ourvidz_serve.catalog import Tier
from ourvidz_serve.errors import Forbidden, InvalidRequest
from ourvidz_serve.persistence.repository import JobRecord


@dataclass(frozen=True)
class Principal:
    """Who is calling: the platform's backend (service key) or one user (JWT)."""

    user_id: UUID | None
    is_service: bool
    key_id: str | None = None
    """Which service key (a hash of it), for rate limits and logs."""
    tier: Tier | None = None
    """A user's service tier, from their token's ``tier`` claim (``None``: standard)."""

    @property
    def rate_subject(self) -> str:
        """Whose request budget a request spends: the key's, or the user's."""
        return f"key:{self.key_id}" if self.is_service else f"user:{self.user_id}"

    def acting_for(self, requested_user_id: UUID | None) -> UUID:
        """The user a request acts for: a service key names one, a user is themselves."""
        if self.is_service:
            if requested_user_id is None:
                raise InvalidRequest("user_id is required with a service API key")
            return requested_user_id
        assert self.user_id is not None
        if requested_user_id is not None and requested_user_id != self.user_id:
            raise Forbidden("user_id does not match the authenticated user")
        return self.user_id

    def can_see(self, job: JobRecord) -> bool:
        return self.is_service or job.user_id == self.user_id
