"""HTTP routes of the jobs feature. Thin: parse, authorize, call the jobs service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent

from ourvidz_serve.api.dependencies import get_state, require_principal
from ourvidz_serve.api.errors import AUTHENTICATED_ERRORS, error_responses
from ourvidz_serve.api.state import AppState
from ourvidz_serve.jobs.principal import Principal
from ourvidz_serve.jobs.protocol import JobList, JobRequest, JobResource, JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post(
    "",
    status_code=202,
    response_model=JobResource,
    responses={
        200: {"model": JobResource, "description": "Idempotent replay"},
        **AUTHENTICATED_ERRORS,
        **error_responses(400, 403, 409, 413, 422),
    },
)
async def submit_job(
    request: JobRequest,
    state: Annotated[AppState, Depends(get_state)],
    principal: Annotated[Principal, Depends(require_principal)],
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    job, created = await state.jobs.submit(request, principal, idempotency_key)
    return JSONResponse(job.model_dump(mode="json"), status_code=202 if created else 200)


async def visible_job(
    job_id: UUID,
    state: Annotated[AppState, Depends(get_state)],
    principal: Annotated[Principal, Depends(require_principal)],
) -> JobResource:
    """The job if the caller may see it, else 404 (before any response, a stream's too)."""
    return await state.jobs.get(job_id, principal)


@router.get(
    "/{job_id}",
    response_model=JobResource,
    responses={**AUTHENTICATED_ERRORS, **error_responses(404, 422)},
)
async def get_job(job: Annotated[JobResource, Depends(visible_job)]) -> JobResource:
    return job


@router.get(
    "",
    response_model=JobList,
    responses={**AUTHENTICATED_ERRORS, **error_responses(403, 422)},
)
async def list_jobs(
    state: Annotated[AppState, Depends(get_state)],
    principal: Annotated[Principal, Depends(require_principal)],
    user_id: UUID | None = None,
    status: JobStatus | None = None,
    job_type: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
) -> JobList:
    return await state.jobs.list(
        principal, user_id=user_id, status=status, job_type=job_type, limit=limit, cursor=cursor
    )


@router.delete(
    "/{job_id}",
    response_model=JobResource,
    responses={**AUTHENTICATED_ERRORS, **error_responses(404, 409, 422)},
)
async def cancel_job(
    job_id: UUID,
    state: Annotated[AppState, Depends(get_state)],
    principal: Annotated[Principal, Depends(require_principal)],
) -> JobResource:
    """Cancel a queued job at once, or a running one at its next denoising step.

    Its asset rows end ``cancelled`` at once; a job that has already completed or failed
    answers 409; cancelling twice answers the cancelled job again.
    """
    return await state.jobs.cancel(job_id, principal)


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={
        200: {"description": "Server-Sent Events: status, progress, asset; ends at the end"},
        **AUTHENTICATED_ERRORS,
        **error_responses(404, 422),
    },
)
async def job_events(
    job: Annotated[JobResource, Depends(visible_job)],
    state: Annotated[AppState, Depends(get_state)],
    principal: Annotated[Principal, Depends(require_principal)],
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> AsyncIterator[ServerSentEvent]:
    """The job's events as they happen, whichever replica runs it or serves this stream.

    Every stream, a reconnection with ``Last-Event-ID`` included, starts with the job's
    current state (``status``, the latest ``progress``, stored ``asset`` URLs); it ends
    after the terminal ``status``. Idle streams get keep-alive comments.
    """
    sequence = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
    async for kind, data in state.jobs.events(job.id, principal):
        sequence += 1
        yield ServerSentEvent(event=kind, data=data, id=str(sequence))
