"""FastAPI dependencies shared by the routers (async, so no threadpool hop)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from ourvidz_serve.api.state import AppState
from ourvidz_serve.errors import ServiceUnavailable
from ourvidz_serve.jobs.principal import Principal


async def get_state(request: Request) -> AppState:
    state = getattr(request.app.state, "ourvidz", None)
    if state is None:
        raise ServiceUnavailable("the service is still starting")
    assert isinstance(state, AppState)
    return state


async def require_principal(
    state: Annotated[AppState, Depends(get_state)],
    authorization: Annotated[str | None, Header()] = None,
) -> Principal:
    """The authenticated caller, after spending one request of its rate budget."""
    principal = state.authenticator.authenticate(authorization)
    await state.limiter.spend(principal)
    return principal
