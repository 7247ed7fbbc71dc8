"""Health, readiness, the job-type catalog and local file downloads."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse, JSONResponse

from ourvidz_serve.api.dependencies import get_state, require_principal
from ourvidz_serve.api.errors import AUTHENTICATED_ERRORS, error_responses
from ourvidz_serve.api.state import AppState
from ourvidz_serve.catalog import JOB_TYPES, WAN_FPS, OutputFormat
from ourvidz_serve.errors import NotFound, ObjectNotFound
from ourvidz_serve.jobs.principal import Principal
from ourvidz_serve.jobs.protocol import JobTypeResource
from ourvidz_serve.jobs.retention import raise_if_expired
from ourvidz_serve.storage.local import LocalStorage

router = APIRouter()


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    """Liveness: the process answers. Needs no credential."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    tags=["health"],
    responses={
        **AUTHENTICATED_ERRORS,
        503: {"description": "Not ready: the body lists each check (or the error shape)"},
    },
)
async def readyz(
    state: Annotated[AppState, Depends(get_state)],
    _principal: Annotated[Principal, Depends(require_principal)],
) -> JSONResponse:
    """Readiness: the database, the storage and every model deployment answer."""
    checks: dict[str, Any] = {}

    async def probe(name: str, check: Any) -> None:
        try:
            result = await asyncio.wait_for(check, timeout=10)
            checks[name] = result if isinstance(result, dict) else "ok"
        except Exception as exc:  # noqa: BLE001 - readiness reports every failure, raises none
            checks[name] = f"error: {type(exc).__name__}: {exc}"

    await asyncio.gather(
        probe("database", state.repository.ping()),
        probe("storage", state.storage.check()),
        probe("models", state.models.check()),
    )
    # This replica's background loops (reaper, callbacks, job events), each with its last success.
    problems = state.supervisor.problems()
    checks["loops"] = f"error: {'; '.join(problems)}" if problems else state.supervisor.report()
    ready = all(value == "ok" or isinstance(value, dict) for value in checks.values())
    body = {"status": "ready" if ready else "not_ready", "checks": checks}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get(
    "/v1/job-types",
    response_model=list[JobTypeResource],
    tags=["catalog"],
    responses=AUTHENTICATED_ERRORS,
)
async def job_types(
    _principal: Annotated[Principal, Depends(require_principal)],
) -> list[JobTypeResource]:
    return [
        JobTypeResource(
            job_type=spec.job_type,
            model=spec.model.value,
            model_type=spec.model_type,
            model_variant=spec.model_variant,
            format=spec.format.value,
            quality=spec.quality.value,
            enhanced=spec.enhanced,
            queue=spec.queue.value,
            bucket=spec.bucket,
            file_extension=spec.file_extension,
            steps=spec.steps,
            guidance_scale=spec.guidance_scale,
            width=spec.width,
            height=spec.height,
            num_frames=spec.num_frames,
            fps=WAN_FPS if spec.format is OutputFormat.VIDEO else None,
            allowed_num_images=list(spec.allowed_num_images),
            expected_time_s=spec.expected_time_s,
        )
        for spec in JOB_TYPES.values()
    ]


@router.get(
    "/v1/files/{bucket}/{key:path}",
    tags=["files"],
    response_class=FileResponse,
    responses={
        200: {"description": "The file", "content": {"application/octet-stream": {}}},
        **error_responses(403, 404, 410, 422, 503),
    },
)
async def download_file(
    bucket: str,
    key: str,
    state: Annotated[AppState, Depends(get_state)],
    expires: Annotated[int, Query()],
    signature: Annotated[str, Query()],
) -> FileResponse:
    """A local-storage object behind an expiring signed URL (the URL is the credential).

    A file that retention deleted answers 410 (``expired``); any other missing file 404.
    """
    storage = state.storage
    if not isinstance(storage, LocalStorage):
        raise NotFound("file downloads are served by the local storage backend only")
    storage.verify(bucket, key, expires, signature)
    try:
        path = await storage.open_for_download(bucket, key)
    except ObjectNotFound:
        await raise_if_expired(state.repository, bucket, key)
        raise
    return FileResponse(path)
