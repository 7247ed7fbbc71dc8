"""HTTP routes of scheduling: the queues per tier, and a user's GPU-time usage."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, Query

from ourvidz_serve.api.dependencies import get_state, require_principal
from ourvidz_serve.api.errors import AUTHENTICATED_ERRORS, error_responses
from ourvidz_serve.api.state import AppState
from ourvidz_serve.catalog import Tier
from ourvidz_serve.jobs.principal import Principal
from ourvidz_serve.jobs.protocol import QueueList, UsageResource

router = APIRouter(prefix="/v1", tags=["scheduling"])


@router.get(
    "/queues",
    response_model=QueueList,
    responses={**AUTHENTICATED_ERRORS, **error_responses(403)},
)
async def queues(
    state: Annotated[AppState, Depends(get_state)],
    principal: Annotated[Principal, Depends(require_principal)],
) -> QueueList:
    """Per queue and tier: queued and running jobs, replicas, the oldest wait and the backlog
    in expected GPU seconds (service key only)."""
    return await state.queues.overview(principal)


@router.get(
    "/usage",
    response_model=UsageResource,
    responses={**AUTHENTICATED_ERRORS, **error_responses(403, 422)},
)
async def usage(
    state: Annotated[AppState, Depends(get_state)],
    principal: Annotated[Principal, Depends(require_principal)],
    user_id: Annotated[
        UUID | None, Query(description="Whose usage (required with a service key)")
    ] = None,
    tier: Annotated[
        Tier | None,
        Query(description="Whose quota applies: any with a service key; a user's is their own"),
    ] = None,
) -> UsageResource:
    """GPU seconds spent in the quota's rolling window, reserved by unfinished jobs, and what
    remains of the tier's quota: a user's own, or any user's with a service key."""
    return await state.usage.usage(principal, user_id, tier)
