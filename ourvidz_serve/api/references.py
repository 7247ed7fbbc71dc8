"""``POST /v1/references``: store a reference image for later SDXL jobs."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, File, Form, UploadFile
from pydantic import BaseModel

from ourvidz_serve.api.dependencies import get_state, require_principal
from ourvidz_serve.api.errors import AUTHENTICATED_ERRORS, error_responses
from ourvidz_serve.api.state import AppState
from ourvidz_serve.errors import PayloadTooLarge
from ourvidz_serve.jobs.principal import Principal

router = APIRouter(prefix="/v1/references", tags=["references"])


class ReferenceResource(BaseModel):
    key: str
    """Pass as ``reference_image_key`` in jobs of the same user."""
    url: str
    width: int
    height: int
    format: str


@router.post(
    "",
    status_code=201,
    response_model=ReferenceResource,
    responses={**AUTHENTICATED_ERRORS, **error_responses(400, 403, 413, 422)},
)
async def upload_reference(
    file: Annotated[UploadFile, File(description="A PNG, JPEG or WebP image")],
    state: Annotated[AppState, Depends(get_state)],
    principal: Annotated[Principal, Depends(require_principal)],
    user_id: Annotated[UUID | None, Form(description="Required with a service API key")] = None,
) -> ReferenceResource:
    """Check the file as an image (by its content, never its name or type) and store it
    clean: orientation applied, metadata stripped, under the user's id."""
    owner = principal.acting_for(user_id)
    limit = state.settings.reference_max_bytes
    # One byte more than allowed tells "too large" without reading the rest.
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"the image is larger than {limit} bytes")
    stored = await state.references.store(data, owner)
    return ReferenceResource(
        key=stored.key,
        url=await state.references.signed_url(stored.key),
        width=stored.width,
        height=stored.height,
        format=stored.format,
    )
