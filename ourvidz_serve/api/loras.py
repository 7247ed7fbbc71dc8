"""``/v1/loras``: the registry of SDXL LoRAs that jobs name in ``loras: [{name, scale}]``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, UploadFile

from ourvidz_serve.api.dependencies import get_state, require_principal
from ourvidz_serve.api.errors import AUTHENTICATED_ERRORS, error_responses
from ourvidz_serve.api.state import AppState
from ourvidz_serve.errors import LoraRejected
from ourvidz_serve.jobs.loras import LoraList, LoraResource
from ourvidz_serve.jobs.principal import Principal

router = APIRouter(prefix="/v1/loras", tags=["loras"])


@router.post(
    "",
    status_code=201,
    response_model=LoraResource,
    responses={**AUTHENTICATED_ERRORS, **error_responses(400, 403, 409, 413, 422)},
)
async def upload_lora(
    file: Annotated[UploadFile, File(description="An SDXL LoRA as .safetensors")],
    name: Annotated[str, Form(description="The name jobs will give in loras[].name")],
    state: Annotated[AppState, Depends(get_state)],
    principal: Annotated[Principal, Depends(require_principal)],
) -> LoraResource:
    """Service key only. The file is checked by its header (safetensors, SDXL UNet or
    text-encoder LoRA names in kohya or diffusers naming, rank, dtype, size) before anything
    is stored; every refusal is a 422 naming its reason."""
    limit = state.loras.max_bytes
    # One byte more than allowed tells "too large" without reading the rest.
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise LoraRejected(f"the file is larger than {limit} bytes", param="file")
    return await state.loras.upload(name, data, principal)


@router.get("", response_model=LoraList, responses=AUTHENTICATED_ERRORS)
async def list_loras(
    state: Annotated[AppState, Depends(get_state)],
    _principal: Annotated[Principal, Depends(require_principal)],
) -> LoraList:
    """The live registry: what a job may name."""
    return await state.loras.list()


@router.delete(
    "/{name}",
    response_model=LoraResource,
    responses={**AUTHENTICATED_ERRORS, **error_responses(403, 404)},
)
async def delete_lora(
    name: str,
    state: Annotated[AppState, Depends(get_state)],
    principal: Annotated[Principal, Depends(require_principal)],
) -> LoraResource:
    """Service key only. Retires the name: jobs already queued with it still run; new jobs
    naming it get 422. The name may be uploaded again."""
    return await state.loras.retire(name, principal)
