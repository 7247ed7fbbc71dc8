"""HTTP routes about a user as a whole: deleting everything kept about them."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, Response

from ourvidz_serve.api.dependencies import get_state, require_principal
from ourvidz_serve.api.errors import AUTHENTICATED_ERRORS, error_responses
from ourvidz_serve.api.state import AppState
from ourvidz_serve.jobs.principal import Principal

router = APIRouter(prefix="/v1/users", tags=["users"])


@router.delete(
    "/{user_id}/data",
    status_code=204,
    response_class=Response,
    responses={
        204: {"description": "Everything kept about the user is deleted (also when none was)"},
        **AUTHENTICATED_ERRORS,
        **error_responses(403, 422, 502),
    },
)
async def delete_user_data(
    user_id: UUID,
    state: Annotated[AppState, Depends(get_state)],
    principal: Annotated[Principal, Depends(require_principal)],
) -> Response:
    """Cancel the user's queued and running jobs, then delete every job, asset row, callback
    delivery, file (references included), fair-order, GPU-usage and rate-limit record of the
    user. Service API keys only (a user token: 403).

    A running job stops at its next denoising step and its worker deletes what it stored.
    Idempotent: calling again answers 204 again; after a failure (e.g. 502 from storage),
    calling again finishes the work.
    """
    await state.users.delete(user_id, principal)
    return Response(status_code=204)
